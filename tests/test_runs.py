"""The workflow on public-style data at the data defaults: fitted length, validation-selected
checkpoint, test metrics with intervals, and a folder per execution that later runs keep."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from llm_finetune.config import FineTuneConfig, from_dict
from tests.public_style import json_extraction_rows


@pytest.mark.slow
def test_public_style_data_at_defaults_two_runs_keep_their_folders(isolated_flyte, monkeypatch, tokenizer, capfd):
    from tests.tiny import save_tiny_llama
    from workflows.fine_tune import fine_tune

    monkeypatch.delenv("LLM_FINETUNE_DECK_DIR")  # the default layout: runs/<execution id>/decks
    runs = isolated_flyte / "runs"
    monkeypatch.setenv("LLM_FINETUNE_RUNS_DIR", str(runs))
    monkeypatch.delenv("LLM_FINETUNE_RUN_ID", raising=False)
    model_dir = save_tiny_llama(isolated_flyte / "tiny", tokenizer, max_position_embeddings=2048)
    rows = json_extraction_rows(300)
    src = isolated_flyte / "extract.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = from_dict(FineTuneConfig, {
        "data": {"source": str(src)},  # everything else in data at its default: max_length auto, overlong drop
        "model": {"base_model": str(model_dir)},
        "train": {"max_steps": 4, "save_steps": 2, "eval_steps": 2, "eval_max_samples": 8, "sample_prompts": 1,
                  "logging_steps": 1},
        "evaluate": {"max_samples": 12},
        "quantize": {"variants": ["int8"]},
    })

    result = fine_tune(config=cfg)
    printed = capfd.readouterr().out
    first = (runs / "latest").resolve()
    summary = json.loads((first / "summary.json").read_text())

    # a fifth of the rows are over 512 tokens; the fitted length keeps at least 99% of them
    assert summary["data"]["rows_in"] == 300 and summary["data"]["dropped_rows"] <= 3
    assert not any("dropped" in w for w in summary["warnings"])  # (a random tiny model's answers are cut: said too)
    assert summary["evaluation"]["max_new_tokens"] > summary["evaluation"]["longest_reference_tokens"] > 8
    assert summary["data"]["max_length"] > 512 and "auto; limited by data" in summary["data"]["length_note"]
    # the checkpoint was chosen on validation rows; scores are on test rows, with intervals
    assert summary["training"]["best_step"] in (2, 4) and summary["data"]["validation_rows"] == 15
    assert f"checkpoint: step {summary['training']['best_step']} of 4, best validation loss" in printed
    t = result.tuned_metrics
    assert t.task_kind == "json" and t.task_metric == "json_field_f1" and t.rows == 12
    assert all(t.scores_low[k] <= t.scores[k] <= t.scores_high[k] for k in t.scores)
    assert "json_field_f1" in printed and "%, " in printed  # "12.0% [0.0%, 33.3%]"-style cells
    summary_deck = (first / "decks" / "summary.html").read_text()
    for text in ("validation rows", "Task metrics, every model", "int8", "valid_json"):
        assert text in summary_deck
    assert f"run folder:  {first}" in printed
    assert (first / "model_card.md").is_file()
    decks = {p.name for p in (first / "decks").glob("*.html")}
    assert decks == {f"{d}.html" for d in ("get_data", "train", "evaluate_base", "evaluate_tuned", "evaluate_quantized", "summary")}

    # a second run (served from the cache) gets its own folder; the first keeps all its decks
    again = fine_tune(config=cfg)
    assert again.tuned_metrics == t
    second = (runs / "latest").resolve()
    assert second != first and (second / "decks" / "summary.html").is_file()
    assert {p.name for p in (first / "decks").glob("*.html")} == decks
    assert f"run folder:  {second}" in capfd.readouterr().out
    assert sorted(p.name for p in runs.iterdir() if not p.is_symlink()) == sorted([first.name, second.name])

"""The summarize task: a drop warning at the top, the validation-chosen checkpoint, metrics with intervals, a run folder."""

import pytest
import json

import pandas as pd
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

from llm_finetune.evaluation.evaluate import EvalMetrics

pytestmark = pytest.mark.slow  # every test here trains a model or starts a process (tests/tiers.py)


def _report(em, low, high):
    table = pd.DataFrame({"prompt": ["p"], "reference": ["2021-03-05"], "prediction": ["x"], "correct": [False]})
    from tasks.evaluate import EvalReport

    m = EvalMetrics(rows=40, loss=0.5, perplexity=1.6, exact_match=em, exact_match_rows=40,
                    scores={"exact_match": em}, scores_low={"exact_match": low}, scores_high={"exact_match": high})
    return EvalReport(metrics=m, samples=StructuredDataset(dataframe=table))


def test_summary_leads_with_dropped_rows_and_names_the_checkpoint(tmp_path, monkeypatch, capfd):
    from tasks.data import DataReport
    from tasks.result import summarize

    monkeypatch.delenv("LLM_FINETUNE_DECK_DIR", raising=False)
    monkeypatch.setenv("LLM_FINETUNE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("LLM_FINETUNE_RUN_ID", raising=False)
    note = "30 of 1000 rows (3.0%) were dropped (too_long 30) at max_length 512; the get_data deck lists them"
    report = DataReport(rows_in=1000, train_rows=820, validation_rows=50, test_rows=100, dropped_rows=30, truncated_rows=0,
                        max_length=512, length_note="max_length 512 (set by data.max_length)", drop_note=note)
    (tmp_path / "m").mkdir()
    summarize(tuned_model=FlyteDirectory(str(tmp_path / "m")), adapter=None, quantized=[], base=_report(0.05, 0.0, 0.125),
              tuned=_report(0.975, 0.925, 1.0), variants=[], tuned_mb=1.0, hub_urls=[], data_report=report,
              train_steps=60, best_step=40, best_eval_loss=0.0123)
    lines = capfd.readouterr().out.split("[summary] fine-tune results\n", 1)[1].splitlines()
    assert lines[0] == f"  WARNING: {note}"
    assert lines[1] == "  checkpoint: step 40 of 60, best validation loss 0.0123 on 50 validation rows (test rows are used for scores only)"
    assert "exact_match" in lines[2] and "5.0% [0.0%, 12.5%]" in lines[2] and "97.5% [92.5%, 100.0%]" in lines[2]
    folder = (tmp_path / "runs" / "latest").resolve()
    assert any(line == f"  run folder:  {folder}  (summary.json, model_card.md, decks/; runs/latest points here)" for line in lines)
    saved = json.loads((folder / "summary.json").read_text())
    assert saved["warnings"] == [note] and saved["training"]["best_step"] == 40
    deck = (folder / "decks" / "summary.html").read_text()
    assert deck.index(note) < deck.index("checkpoint: step 40") < deck.index("<table>")


def test_summary_warns_about_cut_answers_and_records_the_budget(tmp_path, monkeypatch, capfd):
    """Answers that reached the generation budget without a stop token lead the summary, per model."""
    import dataclasses

    from tasks.result import summarize

    monkeypatch.setenv("LLM_FINETUNE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("LLM_FINETUNE_RUN_ID", raising=False)
    base, tuned = _report(0.0, 0.0, 0.0), _report(0.9, 0.8, 1.0)
    base.metrics = dataclasses.replace(base.metrics, max_new_tokens=520, longest_reference_tokens=456, cut_predictions=31)
    tuned.metrics = dataclasses.replace(tuned.metrics, max_new_tokens=520, longest_reference_tokens=456, cut_predictions=0)
    (tmp_path / "m").mkdir()
    summarize(tuned_model=FlyteDirectory(str(tmp_path / "m")), adapter=None, quantized=[], base=base, tuned=tuned,
              variants=[], tuned_mb=1.0, hub_urls=[])
    lines = capfd.readouterr().out.split("[summary] fine-tune results\n", 1)[1].splitlines()
    assert lines[0].startswith("  WARNING: 31 of 40 base predictions reached the generation budget of 520 new tokens "
                               "without a stop token (longest reference 456 tokens)")
    assert not any("tuned predictions reached" in line for line in lines)
    saved = json.loads(((tmp_path / "runs" / "latest").resolve() / "summary.json").read_text())
    assert saved["evaluation"] == {"max_new_tokens": 520, "longest_reference_tokens": 456, "cut_predictions": 0,
                                   "cut_predictions_by_model": {"base": 31, "tuned": 0}}
    assert len(saved["warnings"]) == 1 and "31 of 40 base predictions" in saved["warnings"][0]


def _pref_report(acc):
    from tasks.evaluate import EvalReport

    table = pd.DataFrame({"prompt": ["p"], "reference": ["a"], "prediction": ["a"], "correct": [True],
                          "chosen_logp": [-1.0], "rejected_logp": [-2.0]})
    m = EvalMetrics(rows=40, loss=0.6, perplexity=1.8, task_metric="preference_accuracy", task_kind="preference",
                    preference_accuracy=acc, preference_ci_low=acc - 0.1, preference_ci_high=min(1.0, acc + 0.1),
                    scores={"preference_accuracy": acc}, scores_low={"preference_accuracy": acc - 0.1},
                    scores_high={"preference_accuracy": min(1.0, acc + 0.1)})
    return EvalReport(metrics=m, samples=StructuredDataset(dataframe=table))


def test_after_dpo_the_sft_task_is_reported_for_base_sft_and_sft_dpo_and_a_drop_is_a_warning(tmp_path, monkeypatch, capfd):
    from tasks.result import summarize

    monkeypatch.setenv("LLM_FINETUNE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("LLM_FINETUNE_RUN_ID", raising=False)
    (tmp_path / "m").mkdir()

    def run(final_em):
        return summarize(tuned_model=FlyteDirectory(str(tmp_path / "m")), adapter=None, quantized=[],
                         base=_pref_report(0.55), tuned=_pref_report(0.8), variants=[], tuned_mb=1.0, hub_urls=[],
                         task_scores=[_report(0.05, 0.0, 0.125), _report(0.8, 0.7, 0.9), _report(final_em, final_em - 0.1, final_em + 0.05)])

    kept = run(0.75)  # within the SFT model's interval [70%, 90%]
    out = capfd.readouterr().out
    assert "SFT task after DPO" in out and "WARNING: the DPO stage lowered" not in out
    row = next(line for line in out.splitlines() if line.strip().startswith("exact_match") and "SFT+DPO" in line)
    assert "base 5.0% [0.0%, 12.5%]" in row and "SFT 80.0% [70.0%, 90.0%]" in row and "SFT+DPO 75.0% [65.0%, 80.0%]" in row
    assert list(kept.sft_task_metrics) == ["base", "SFT", "SFT+DPO"]
    assert kept.sft_task_metrics["SFT+DPO"].exact_match == 0.75
    saved = json.loads(((tmp_path / "runs" / "latest").resolve() / "summary.json").read_text())
    assert list(saved["sft_task"]) == ["base", "SFT", "SFT+DPO"] and saved["sft_task"]["SFT"]["exact_match"] == 0.8
    assert saved["tuned"]["preference_accuracy"] == 0.8  # the pairs' score stays beside it

    run(0.6)  # below 70%: DPO cost the task the user trained for
    out = capfd.readouterr().out
    assert ("WARNING: the DPO stage lowered the SFT task's exact_match from 80.0% (SFT) to 60.0% (SFT+DPO), below the "
            "SFT model's 95% interval [70.0%, 90.0%]") in out
    deck = ((tmp_path / "runs" / "latest").resolve() / "decks" / "summary.html").read_text()
    assert "SFT task after DPO" in deck

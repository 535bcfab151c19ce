"""Users' data at the defaults: JSON answers of 100-900 tokens, and the Alpaca seed tasks.

The embedded ISO-date set has one-word answers, where a 32-token generation budget, a
structure-only JSON metric and a length capped by a batch of 4 all look fine. These tests
use the shapes users bring: every row kept (the batch is fitted instead), every answer
scored whole, JSON judged field by field.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from llm_finetune.config import DataConfig, EvalConfig, FineTuneConfig, TrainConfig, from_dict
from llm_finetune.data.lengths import choose_max_length
from llm_finetune.data.prepare import prepare
from tests.public_style import order_extraction_rows

SEED_TASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_seed_tasks.jsonl"
SMOL_PARAMS = 134_515_008  # SmolLM2-135M, the embedded model


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def smol_chooser(base_model_dir: Path, train: TrainConfig):
    """get_data's length fitting for the embedded model and the default CPU training hardware."""
    config = json.loads((base_model_dir / "config.json").read_text())
    return lambda lengths, requested: choose_max_length(lengths, requested, config, SMOL_PARAMS, train)


class ReproducingLM(torch.nn.Module):
    """A causal LM whose greedy choice at every position is the next token of the scored row, and a
    stop token after the row's last token: the model that reproduces every reference exactly.

    It stands in for a perfectly tuned model so that the scoring path (loss pass, answers read
    off it, budget, metrics) is judged on answers of hundreds of tokens without training one.
    """

    def __init__(self, vocab_size: int, stop_id: int):
        super().__init__()
        self.vocab_size, self.stop_id = vocab_size, stop_id
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.generation_config = SimpleNamespace(eos_token_id=stop_id)

    @property
    def device(self):
        return self.anchor.device

    def forward(self, input_ids, attention_mask=None, **_):
        nxt = torch.full_like(input_ids, self.stop_id)
        nxt[:, :-1] = input_ids[:, 1:]
        if attention_mask is not None:  # right padding: the last real token is followed by the stop token
            last = attention_mask.sum(1) - 1
            nxt[torch.arange(len(nxt)), last] = self.stop_id
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab_size).float())


def heldout_frame(tokenizer, rows: list[dict], tmp_path: Path) -> pd.DataFrame:
    """The test split get_data writes for these rows (one split; every row kept)."""
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    prepared = prepare(DataConfig(source=src, format="alpaca", test_fraction=0.25, validation_fraction=0.05), tokenizer)
    return prepared.test


def evaluate_reproduced(monkeypatch, base_model_dir, tokenizer, frame, cfg):
    from llm_finetune.evaluation import evaluate as ev

    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: ReproducingLM(len(tokenizer), stop))
    return ev.evaluate(base_model_dir, frame, DataConfig(format="alpaca"), cfg)


def test_order_rows_have_the_shape_of_a_real_extraction_set(tokenizer):
    rows = order_extraction_rows(300)
    answers = np.array([len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in rows])
    assert answers.min() >= 100 and answers.max() <= 1000 and np.median(answers) > 400
    assert all(isinstance(json.loads(r["output"])["items"], list) for r in rows)


def test_every_order_row_is_kept_at_defaults_by_fitting_the_batch(base_model_dir, tokenizer, tmp_path):
    """Defaults on 2 CPU processes with 8 GiB: 4 rows of ~1,700 tokens do not fit; 1 row with checkpointing does."""
    rows = order_extraction_rows(300)
    src = write_jsonl(tmp_path / "orders.jsonl", rows)
    p = prepare(DataConfig(source=src, format="alpaca"), tokenizer, smol_chooser(base_model_dir, TrainConfig()))
    # the length keeps 99% of the rows (the longest 1% are outliers the run need not pay for), not the
    # ~45% a 4-row micro-batch would have allowed
    assert p.report.rows_kept >= 297 and p.drop_note() == ""
    assert p.length.limited_by == "data" and p.max_length >= np.quantile(p.lengths, 0.99)
    plan = p.length.plan
    assert plan.micro_batch < 4 and plan.micro_batch * plan.gradient_accumulation_steps == 4
    assert "tokens per optimizer step unchanged" in plan.note and plan.note in p.length.describe()

    # the same data with the batch size set: kept as given, and the run stops before training with the fix
    from llm_finetune.errors import DataError

    with pytest.raises(DataError, match="train.per_device_batch_size: auto to keep the rows"):
        prepare(DataConfig(source=src, format="alpaca"), tokenizer,
                smol_chooser(base_model_dir, TrainConfig(per_device_batch_size=4)))


def test_a_model_that_reproduces_long_json_answers_scores_them_whole(monkeypatch, base_model_dir, tokenizer, tmp_path):
    frame = heldout_frame(tokenizer, order_extraction_rows(36, seed=3), tmp_path)
    refs = [json.loads(m)[-1]["content"] for m in frame["messages"]]
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
    assert longest > 300

    metrics, table = evaluate_reproduced(monkeypatch, base_model_dir, tokenizer, frame, EvalConfig(max_samples=0, batch_size=2))
    assert metrics.task_kind == "json" and metrics.task_metric == "json_field_f1"
    assert metrics.longest_reference_tokens == longest and metrics.max_new_tokens >= longest
    assert metrics.cut_predictions == 0 and list(table["prediction"]) == refs
    for name in ("json_field_f1", "valid_json", "json_exact", "exact_match"):
        assert metrics.scores[name] == 1.0 and metrics.scores_low[name] == 1.0, name

    # the old fixed budget of 32 tokens: the same perfect model, every answer cut and scored invalid
    cut, _ = evaluate_reproduced(monkeypatch, base_model_dir, tokenizer, frame, EvalConfig(max_samples=0, max_new_tokens=32, batch_size=2))
    assert cut.cut_predictions == len(frame) and cut.scores["valid_json"] == 0.0


@pytest.mark.skipif(not SEED_TASKS.is_file(), reason="../shared/data/alpaca_seed_tasks.jsonl is not here")
def test_alpaca_seed_tasks_at_defaults(monkeypatch, base_model_dir, tokenizer):
    """175 human-written tasks, nested (instances), free text of very different lengths."""
    data = DataConfig(source=str(SEED_TASKS), explode="instances", format="alpaca",
                      columns={"input": "instances.input", "output": "instances.output"})
    p = prepare(data, tokenizer, smol_chooser(base_model_dir, TrainConfig()))
    assert p.report.rows_in >= 175 and p.dropped_fraction <= 0.01
    metrics, table = evaluate_reproduced(monkeypatch, base_model_dir, tokenizer, p.test, EvalConfig(max_samples=0, batch_size=2))
    assert metrics.task_kind == "chrf" and metrics.cut_predictions == 0
    assert metrics.max_new_tokens >= metrics.longest_reference_tokens > 32
    assert metrics.scores["chrf"] == pytest.approx(1.0) and metrics.scores["exact_match"] == 1.0


@pytest.mark.slow
def test_fine_tune_on_long_json_answers_at_defaults(isolated_flyte, monkeypatch, tokenizer):
    """The whole workflow with only data.source / data.format and a few steps set.

    The model is a 2-layer Llama with the embedded model's 49k vocabulary, so the run takes about two
    minutes on CPU where SmolLM2-135M took 16 (README: the measured run); its fp32 logits
    alone (3 x vocabulary x 4 bytes per token) keep 4 rows of ~1,700 tokens out of 4 GiB per
    process, so the batch is fitted here too.
    """
    from tests.tiny import save_tiny_llama
    from workflows.fine_tune import fine_tune

    runs = isolated_flyte / "runs"
    monkeypatch.setenv("LLM_FINETUNE_RUNS_DIR", str(runs))
    monkeypatch.delenv("LLM_FINETUNE_RUN_ID", raising=False)
    model_dir = save_tiny_llama(isolated_flyte / "tiny", tokenizer, max_position_embeddings=4096)
    src = write_jsonl(isolated_flyte / "orders.jsonl", order_extraction_rows(240, seed=1))
    cfg = from_dict(FineTuneConfig, {
        "data": {"source": src, "format": "alpaca"},
        "model": {"base_model": str(model_dir)},
        "train": {"max_steps": 2},
        "evaluate": {"max_samples": 8},
        "quantize": {"variants": []},
    })
    result = fine_tune(config=cfg)
    summary = json.loads(((runs / "latest").resolve() / "summary.json").read_text())
    data, evaluation = summary["data"], summary["evaluation"]
    assert data["rows_in"] == 240 and data["dropped_rows"] <= 0.01 * 240
    assert "micro-batch 4 -> " in data["batch_note"] and "tokens per optimizer step unchanged" in data["batch_note"]
    assert evaluation["max_new_tokens"] >= evaluation["longest_reference_tokens"] > 500
    assert set(evaluation["cut_predictions_by_model"]) == {"base", "tuned"}
    # a random model rambles to the budget: said at the top of the summary, with the budget and the longest reference
    cut = evaluation["cut_predictions_by_model"]["tuned"]
    if cut:
        assert any(w.startswith(f"{cut} of 8 tuned predictions reached the generation budget of {evaluation['max_new_tokens']}")
                   for w in summary["warnings"])
    t = summary["tuned"]
    assert t["task_metric"] == "json_field_f1" and "json_field_f1" in t["scores"]
    assert t["scores_low"]["json_field_f1"] <= t["scores"]["json_field_f1"] <= t["scores_high"]["json_field_f1"]
    assert result.tuned_metrics.rows == 8

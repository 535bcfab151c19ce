"""lm-eval-harness on a local BoolQ-style task (tests/lm_eval_tasks/tiny_boolq), offline, on the embedded model."""

import json
from pathlib import Path

import pytest
import torch

from llm_finetune.config import EvalConfig

TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.mark.slow
def test_benchmarks_are_off_by_default(base_model_dir):
    from llm_finetune.evaluation.benchmarks import run_benchmarks

    assert EvalConfig().lm_eval_tasks == [] and run_benchmarks(base_model_dir, EvalConfig()) == {}


@pytest.mark.slow
def test_local_multiple_choice_task_matches_our_own_loglikelihood_scoring(base_model_dir, tokenizer):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM

    from llm_finetune.evaluation.benchmarks import run_benchmarks

    scores = run_benchmarks(base_model_dir, EvalConfig(lm_eval_tasks=["tiny_boolq"], lm_eval_include_path=str(TASKS)))
    # the same zero-shot rule by hand: pick the choice (" no" / " yes") with the higher log-likelihood
    model = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    rows = [json.loads(line) for line in (TASKS / "tiny_boolq" / "tiny_boolq.jsonl").read_text().splitlines()]
    correct = 0
    for r in rows:
        ctx = tokenizer(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", add_special_tokens=False)["input_ids"]
        lls = []
        for choice in (" no", " yes"):
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].log_softmax(-1)
            lls.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        correct += int(max(range(2), key=lambda i: lls[i]) == r["label"])
    assert scores["tiny_boolq"] == pytest.approx(correct / len(rows))


def test_missing_task_or_package_is_a_clear_error(base_model_dir, monkeypatch):
    import importlib.util

    from llm_finetune.evaluation.benchmarks import BenchmarkError, check_available, run_benchmarks

    if importlib.util.find_spec("lm_eval") is not None:
        with pytest.raises(BenchmarkError, match="unknown task"):
            run_benchmarks(base_model_dir, EvalConfig(lm_eval_tasks=["no_such_task"], lm_eval_include_path=str(TASKS)))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(BenchmarkError, match=r"lm_eval is not installed: pip install .*lm-eval"):
        check_available(EvalConfig(lm_eval_tasks=["piqa"]))

"""Checkpoint/resume, best-checkpoint choice, samples, NaN guard and token-normalised accumulation.

All on a tiny random Llama in one process (seconds each on CPU).
"""

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from llm_finetune.training.checkpoint import COMPLETE_MARKER, LocalCheckpointStore
from llm_finetune.config import DataConfig, TrainConfig
from llm_finetune.data.prepare import prepare
from llm_finetune.training.harness import train
from tests.tiny import save_tiny_llama

pytestmark = pytest.mark.slow  # every test here trains a model or starts a process (tests/tiers.py)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer)


@pytest.fixture(scope="module")
def splits(tokenizer):
    prepared = prepare(DataConfig(), tokenizer)
    return prepared.train, prepared.validation


class FailAt(TrainerCallback):
    """Simulates a preemption: the process dies right after optimizer step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _losses(summary):
    return {h["step"]: h["loss"] for h in summary.log_history if "loss" in h}


def test_resumed_run_ends_where_an_uninterrupted_run_ends(tiny_dir, splits, tmp_path):
    train_frame, _ = splits
    cfg = TrainConfig(weights="full", max_steps=16, save_steps=4, eval_steps=0, per_device_batch_size=4,
                      learning_rate=3e-3, logging_steps=1, warmup_ratio=0.1)
    clean = train(tiny_dir, train_frame, DataConfig(), cfg, tmp_path / "clean").summary

    store = LocalCheckpointStore(tmp_path / "store")
    with pytest.raises(RuntimeError, match="injected failure at step 10"):
        train(tiny_dir, train_frame, DataConfig(), cfg, tmp_path / "attempt1", checkpoint_store=store, callbacks=[FailAt(10)])
    stored = sorted(p.name for p in store.root.iterdir())
    assert stored == ["checkpoint-4", "checkpoint-8"]  # the newest train.keep_checkpoints (2)
    assert (store.root / "checkpoint-8" / f"{COMPLETE_MARKER}.node0").is_file()

    steps = StepRecorder()
    resumed = train(tiny_dir, train_frame, DataConfig(), cfg, tmp_path / "attempt2", checkpoint_store=store,
                    callbacks=[steps]).summary
    assert resumed.resumed_from_step == 8 and resumed.steps == clean.steps == 16
    assert steps.steps == list(range(9, 17))  # the retry repeats 10 - 8 = 2 steps, less than one interval (4)
    # optimizer, scheduler, RNG and data position restored: the resumed steps see the same batches and updates
    a, b = _losses(clean), _losses(resumed)
    assert sorted(b) == sorted(a)
    for step in range(9, 17):
        assert b[step] == pytest.approx(a[step], rel=1e-3, abs=1e-4), step
    lr = {name: [h["learning_rate"] for h in run.log_history if "loss" in h and h["step"] > 8]
          for name, run in (("clean", clean), ("resumed", resumed))}
    assert len(lr["clean"]) == 8 and lr["resumed"] == lr["clean"]  # the scheduler continued, not restarted


def test_best_checkpoint_by_validation_loss_is_returned_with_samples_and_profile(tiny_dir, splits, tmp_path):
    from transformers import AutoModelForCausalLM

    train_frame, eval_frame = splits
    # Validation completions the training data pushes away from: their loss rises as training
    # goes on, so the best checkpoint is an early one and "best" differs from "last".
    # (the validation split carries token rows since issue 15: drop them so the edited messages are encoded)
    eval_frame = eval_frame.drop(columns=["input_ids", "labels", "seq_lens"], errors="ignore").copy()
    eval_frame["messages"] = [
        json.dumps(json.loads(m)[:-1] + [{"role": "assistant", "content": " ".join(["Purple elephants juggle violins quietly."] * 6)}])
        for m in eval_frame["messages"]
    ]
    cfg = TrainConfig(weights="full", max_steps=16, save_steps=4, eval_steps=4, eval_max_samples=16,
                      per_device_batch_size=4, learning_rate=1e-2, logging_steps=2, sample_prompts=3,
                      sample_max_new_tokens=6, profile_interval_s=0.2)
    out = train(tiny_dir, train_frame, DataConfig(), cfg, tmp_path, eval_frame=eval_frame)
    s = out.summary
    evals = {h["step"]: h["eval_loss"] for h in s.log_history if "eval_loss" in h}
    assert sorted(evals) == [4, 8, 12, 16]
    assert s.best_step == min(evals, key=evals.get) < 16 and s.best_eval_loss == pytest.approx(evals[s.best_step])
    # the returned model is the best checkpoint's weights, not simply the last step's
    best = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / f"checkpoint-{s.best_step}")
    returned = AutoModelForCausalLM.from_pretrained(out.model_dir)
    for (name, p), q in zip(best.state_dict().items(), returned.state_dict().values()):
        assert torch.equal(p, q), name
    # sample generations: the same 3 held-out prompts at every evaluation
    assert [(r["step"], r["prompt_id"]) for r in s.samples] == [(st, i) for st in (4, 8, 12, 16) for i in range(3)]
    assert len({r["prompt"] for r in s.samples}) == 3 and all(isinstance(r["generation"], str) for r in s.samples)
    # resource profile sampled during training; CPU and RAM without a GPU
    assert len(s.resource_profile) >= 2 and all(r["ram_used_gb"] > 0 for r in s.resource_profile)
    assert json.loads((tmp_path / "train_summary.json").read_text())["best_step"] == s.best_step


def test_training_stops_at_the_first_non_finite_loss(tokenizer, splits, tmp_path):
    from transformers import AutoModelForCausalLM

    poisoned = save_tiny_llama(tmp_path / "poisoned", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(poisoned)
    with torch.no_grad():
        model.model.norm.weight.fill_(math.inf)
    model.save_pretrained(poisoned)
    steps = StepRecorder()
    cfg = TrainConfig(weights="full", max_steps=50, save_steps=0, eval_steps=0, per_device_batch_size=2)
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 1 .*stopped at the first non-finite"):
        train(poisoned, splits[0], DataConfig(), cfg, tmp_path / "out", callbacks=[steps])
    assert steps.steps == []  # not a single optimizer step on a NaN loss


class GradCapture(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grad = torch.cat([p.grad.detach().flatten().clone() for p in model.parameters() if p.grad is not None])


def test_gradient_accumulation_normalises_by_trained_tokens(tiny_dir, tokenizer, splits, tmp_path):
    """bs=2 x accumulation 1 and bs=1 x accumulation 2 must give the same gradient.

    Only true when the loss is summed over tokens and divided by the trained tokens of the
    whole accumulated batch (HF's ``num_items_in_batch``); averaging per micro-batch would
    weight the two examples' tokens differently, since their trained-token counts differ.
    """
    from llm_finetune.training.recipes.sft import RECIPE

    data = DataConfig(train_on_prompt=True)  # prompts differ in length, so trained tokens differ
    frame = splits[0].head(2)  # exactly the two examples of the one optimizer step
    grads = {}
    for bs, ga in ((2, 1), (1, 2)):
        cap = GradCapture()
        cfg = TrainConfig(weights="full", max_steps=1, save_steps=0, eval_steps=0, per_device_batch_size=bs,
                          gradient_accumulation_steps=ga, warmup_ratio=0.0)
        train(tiny_dir, frame, data, cfg, tmp_path / f"bs{bs}", callbacks=[cap])
        grads[bs] = cap.grad
    examples = RECIPE.examples(tokenizer, frame, data)
    counts = [sum(x != -100 for x in e["labels"]) for e in examples]
    assert len(counts) == 2 and counts[0] != counts[1]  # a per-micro-batch mean would weight them differently
    assert torch.allclose(grads[2], grads[1], rtol=1e-3, atol=1e-6)


def test_store_keeps_the_newest_checkpoints_and_a_corrupt_newest_one_is_skipped(tiny_dir, splits, tmp_path, caplog):
    """keep_checkpoints bounds the store; a truncated newest checkpoint falls back to the one before, with a warning."""
    train_frame, _ = splits
    cfg = TrainConfig(weights="full", max_steps=12, save_steps=2, eval_steps=0, per_device_batch_size=4,
                      learning_rate=3e-3, logging_steps=1, warmup_ratio=0.1, keep_checkpoints=2)
    clean = train(tiny_dir, train_frame, DataConfig(), cfg, tmp_path / "clean").summary
    store = LocalCheckpointStore(tmp_path / "store")
    stored = lambda: sorted((p.name for p in store.root.iterdir()), key=lambda n: int(n.split("-")[1]))  # noqa: E731
    with pytest.raises(RuntimeError, match="injected failure at step 9"):
        train(tiny_dir, train_frame, DataConfig(), cfg, tmp_path / "attempt1", checkpoint_store=store, callbacks=[FailAt(9)])
    assert stored() == ["checkpoint-6", "checkpoint-8"]  # saved at 2, 4, 6, 8; the newest 2 kept
    optimizer = store.root / "checkpoint-8" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # an upload cut short / a corrupt object

    with caplog.at_level("WARNING", logger="llm_finetune.training.checkpoint"):
        resumed = train(tiny_dir, train_frame, DataConfig(), cfg, tmp_path / "attempt2", checkpoint_store=store).summary
    assert any("skipping checkpoint-8: optimizer.pt has 100 bytes" in r.message for r in caplog.records), caplog.text
    assert resumed.resumed_from_step == 6 and resumed.steps == clean.steps == 12
    a, b = _losses(clean), _losses(resumed)
    for step in range(7, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-3, abs=1e-4), step
    assert stored() == ["checkpoint-10", "checkpoint-12"]  # at most keep_checkpoints after the run

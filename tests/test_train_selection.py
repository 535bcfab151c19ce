"""Checkpoint selection and early stopping on the validation split (train() core, tiny model, one process)."""

import pytest

from llm_finetune.config import DataConfig, TrainConfig
from llm_finetune.data.prepare import prepare
from llm_finetune.training.harness import train
from tests.tiny import save_tiny_llama

pytestmark = pytest.mark.slow  # every test here trains a model or starts a process (tests/tiers.py)


@pytest.mark.parametrize("patience, steps", [(2, 3), (0, 5)])
def test_early_stopping_on_validation_loss(patience, steps, tokenizer, tmp_path):
    """A learning rate of 0 never improves the validation loss: patience 2 stops after the 3rd evaluation."""
    p = prepare(DataConfig(), tokenizer)
    model_dir = save_tiny_llama(tmp_path / "tiny", tokenizer)
    cfg = TrainConfig(weights="full", max_steps=5, learning_rate=0.0, warmup_ratio=0.0, per_device_batch_size=2,
                      eval_steps=1, save_steps=1, eval_max_samples=4, sample_prompts=0, logging_steps=1,
                      early_stopping_patience=patience)
    out = train(model_dir, p.train.head(40), DataConfig(), cfg, tmp_path / "out", eval_frame=p.validation)
    s = out.summary
    evals = [h["eval_loss"] for h in s.log_history if "eval_loss" in h]
    assert s.steps == steps and len(evals) == steps
    assert len(set(evals)) == 1 and s.best_step == 1  # equal losses: the first stays the best

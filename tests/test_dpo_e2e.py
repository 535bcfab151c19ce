"""configs/dpo_smoke.yaml through the whole workflow, as `pyflyte run` runs it: 2 gloo processes, real DPO."""

from pathlib import Path

import pytest

from llm_finetune.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.e2e  # make test-e2e (make test leaves these out: CI time)
def test_dpo_smoke_raises_preference_accuracy_beyond_the_interval(isolated_flyte, capfd):
    from workflows.fine_tune import fine_tune

    cfg = load_config(ROOT / "configs" / "dpo_smoke.yaml")
    result = fine_tune(config=cfg)

    base, tuned = result.base_metrics, result.tuned_metrics
    assert base.task_metric == tuned.task_metric == "preference_accuracy"
    assert base.rows == tuned.rows == cfg.evaluate.max_samples
    gain, low, high = result.preference_gain
    assert gain == pytest.approx(tuned.preference_accuracy - base.preference_accuracy)
    assert low > 0, f"tuned {tuned.preference_accuracy:.1%} vs base {base.preference_accuracy:.1%}: gain interval [{low}, {high}]"
    assert tuned.preference_ci_low > base.preference_ci_high  # the bar: above base by more than the interval
    assert (Path(result.adapter.download()) / "adapter_config.json").is_file()

    printed = capfd.readouterr().out
    assert "preference accuracy (200 held-out pairs" in printed and "tuned is above base by more than the interval" in printed
    train_deck = (isolated_flyte / "decks" / "train.html").read_text()
    assert "DPO metrics" in train_deck and "rewards/margins" in train_deck
    assert "Sample pairs" in (isolated_flyte / "decks" / "get_data.html").read_text()

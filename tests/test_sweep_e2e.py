"""configs/sweep_smoke.yaml through the workflow: 4 trials on the embedded default, the winner evaluated, every
trial tracked in its own MLflow run nested under the execution's, and a second identical run served from the cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llm_finetune.config import FineTuneConfig, from_dict, load_config, sweep_trials

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sweep_smoke_trains_every_trial_and_only_the_best_goes_on(isolated_flyte, capfd, monkeypatch):
    from mlflow import MlflowClient

    from workflows.fine_tune import fine_tune

    monkeypatch.chdir(isolated_flyte)  # the local MLflow store (runs/mlflow.db) and run folders land here
    cfg = load_config(ROOT / "configs" / "sweep_smoke.yaml")
    cfg = from_dict(FineTuneConfig, {**cfg.to_dict(), "quantize": {"variants": []}, "tracking": {"backend": "mlflow"}})
    grid = sweep_trials(cfg.sweep)
    assert len(grid) == 4 and cfg.sweep.concurrency == 2

    result = fine_tune(config=cfg)
    printed = capfd.readouterr().out
    report = result.sweep
    assert [json.loads(v) for t in report.trials for v in t.settings.values()] == [v for g in grid for v in g.values()]
    losses = [t.validation_loss for t in report.trials]
    assert all(math.isfinite(x) for x in losses)
    chosen = report.trials[report.chosen]
    assert chosen.chosen and chosen.validation_loss == min(losses)
    # six steps at 1e-3 learn the ISO dates far faster than at 1e-4, whatever the rank
    assert json.loads(chosen.settings["train.learning_rate"]) == 1e-3
    # the model that goes on is the winner's: its adapter has the winner's rank, and the checkpoint line is its loss
    adapter_config = json.loads((Path(result.adapter.download()) / "adapter_config.json").read_text())
    assert adapter_config["r"] == json.loads(chosen.settings["train.lora.r"])
    assert f"best validation loss {chosen.validation_loss:.4f}" in printed
    assert result.tuned_metrics.loss < result.base_metrics.loss
    # printed table, summary.json's sweep section, the sweep deck
    assert "* " + str(chosen.index) in printed and "[sweep] trials" in printed
    # locally the dynamic runs its nodes one at a time: the run says so instead of promising concurrency
    assert "[sweep] 4 trials, one after another locally:" in printed
    summary = json.loads((Path(printed.split("run folder:")[1].split()[0]) / "summary.json").read_text())
    section = summary["sweep"]
    assert [t["settings"] for t in section["trials"]] == grid
    assert [t["validation_loss"] for t in section["trials"]] == pytest.approx(losses)
    assert section["chosen"]["trial"] == chosen.index
    assert "Chosen: trial" in (isolated_flyte / "decks" / "sweep.html").read_text()

    # one MLflow run per trial, nested under the execution's run, each with its own curves and result
    client = MlflowClient(tracking_uri=f"sqlite:///{isolated_flyte / 'runs' / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "flyte-llm-finetune"]
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: int(r.data.tags["sweep.trial"]))
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    for trial, child in zip(report.trials, children):
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
        assert child.data.params["train.learning_rate"] == str(json.loads(trial.settings["train.learning_rate"]))
        assert child.data.metrics["validation_loss"] == pytest.approx(trial.validation_loss)
        assert child.data.metrics["chosen"] == float(trial.chosen)
        assert [m.step for m in client.get_metric_history(child.info.run_id, "eval/loss")] == [3, 6]
    # the execution's run holds the winner's curves
    assert [m.value for m in client.get_metric_history(parent.info.run_id, "eval/loss")][-1] == pytest.approx(
        chosen.validation_loss)

    # an identical second run is served from the cache: nothing retrained, the same winner and table
    again = fine_tune(config=cfg)
    printed = capfd.readouterr().out
    assert again.tuned_model.path == result.tuned_model.path and again.sweep == report
    assert "[sweep] trials" not in printed and "deck: file://" + str(isolated_flyte / "decks" / "train.html") not in printed
    assert "* " + str(chosen.index) in printed  # the summary still lists the trials

"""Experiment tracking: whole local workflow runs tracked in MLflow and in W&B (offline), read back with their own
readers; a tracker failing mid-run never stops training; secrets never reach a store."""

import hashlib
import json
from pathlib import Path

import pytest

from llm_finetune.config import FineTuneConfig, from_dict, validate
from llm_finetune.errors import ConfigError
from tests.tiny import save_tiny_llama

WANDB_SECRET = "wandb_SECRETkey_0f3a9c7e5b1d"
HF_SECRET = "hf_SECRETtoken_7c1e0b9a"
URI_PASSWORD = "uriPASSWORD_93b1"

# a tiny model and few steps: the point is what reaches the tracker, not what the model learns
MAX_STEPS, LOGGING_STEPS, EVAL_STEPS = 6, 2, 3


def _config(tiny: Path, data: Path, tracking: dict, variants=("int8",)) -> FineTuneConfig:
    return from_dict(FineTuneConfig, {
        "model": {"base_model": str(tiny)},
        "data": {"source": str(data), "max_length": 128, "eval_fraction": 0.2},
        "train": {"weights": "full", "max_steps": MAX_STEPS, "logging_steps": LOGGING_STEPS, "eval_steps": EVAL_STEPS,
                  "save_steps": EVAL_STEPS, "eval_max_samples": 8, "sample_prompts": 1, "sample_max_new_tokens": 4,
                  "per_device_batch_size": 4, "learning_rate": 1e-3},
        "evaluate": {"max_samples": 8, "max_new_tokens": 4},
        "quantize": {"variants": list(variants)},
        "tracking": tracking,
    })


def _expected_steps(every: int, first: bool) -> list[int]:
    """The Trainer logs at step 1 (logging_first_step) and at every multiple of ``every`` up to max_steps."""
    steps = [s for s in range(1, MAX_STEPS + 1) if s % every == 0]
    return sorted({1, *steps}) if first else steps


def _grep(folder: Path, *needles: str) -> list[str]:
    hits = []
    for f in folder.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            hits += [f"{f}: {n}" for n in needles if n.encode() in data]
    return hits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-tracking"), tokenizer)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The first 120 rows of the embedded dataset: enough for 6 steps and a small held-out split."""
    from llm_finetune.data import iso_dates

    rows = iso_dates.SHIPPED_FILE.read_text().splitlines()[:120]
    path = tmp_path_factory.mktemp("tracking-data") / "iso_dates_120.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def no_file_store(monkeypatch):
    """MLFLOW_ALLOW_FILE_STORE unset, and unset again afterwards (the folder store's client sets it in the process)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


@pytest.fixture
def secrets(monkeypatch):
    """The Flyte secrets as flytekit serves them locally; HF_TOKEN / WANDB_API_KEY must not be what is used."""
    monkeypatch.setenv("_FSEC_WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.setenv("_FSEC_HUGGINGFACE_TOKEN", HF_SECRET)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)


# ------------------------------------------------------------------------------------------------ config


def test_wrong_backend_name_is_rejected_with_a_suggestion():
    with pytest.raises(ConfigError) as e:
        validate(from_dict(FineTuneConfig, {"tracking": {"backend": "mlfow"}}))
    assert "tracking.backend: 'mlfow' is not one of none, mlflow, wandb (did you mean 'mlflow'?)" in str(e.value)


def test_wandb_without_api_key_fails_in_validate_config(monkeypatch):
    from tasks.validate import validate_config

    monkeypatch.delenv("_FSEC_WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = from_dict(FineTuneConfig, {"tracking": {"backend": "wandb"}})
    with pytest.raises(Exception) as e:
        validate_config(config=cfg)
    assert "tracking.backend: wandb needs an API key" in str(e.value) and "wandb/api_key" in str(e.value)

    monkeypatch.setenv("_FSEC_WANDB_API_KEY", WANDB_SECRET)  # the Flyte secret is there
    assert validate_config(config=cfg).config.tracking.backend == "wandb"
    monkeypatch.delenv("_FSEC_WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "offline")  # or no key needed at all
    assert validate_config(config=cfg).config.tracking.backend == "wandb"


# ------------------------------------------------------------------------------------------------ MLflow


@pytest.mark.slow
def test_workflow_run_tracked_in_mlflow(isolated_flyte, tiny, data, secrets, no_file_store, monkeypatch, capfd):
    """Empty tracking.uri: a real MLflow SQLite store, runs/mlflow.db, read back with MlflowClient as a user would
    (MLflow 3 opens it as is; the folder store would need MLFLOW_ALLOW_FILE_STORE=true)."""
    import os

    from mlflow import MlflowClient

    from workflows.fine_tune import fine_tune

    monkeypatch.chdir(isolated_flyte)
    cfg = _config(tiny, data, {"backend": "mlflow", "tags": {"team": "nlp", "mirror": f"https://bob:{URI_PASSWORD}@example.org/x"}})
    result = fine_tune(config=cfg)

    store = isolated_flyte / "runs"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ and not (store / "mlruns").exists()
    client = MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "flyte-llm-finetune"]
    (run,) = client.search_runs([exp.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("local-")

    # the full resolved config as params
    params = run.data.params
    assert params["train.max_steps"] == str(MAX_STEPS) and params["model.base_model"] == str(tiny)
    assert params["train.lora.r"] == "16" and json.loads(params["quantize.variants"]) == ["int8"]
    assert params["tracking.backend"] == "mlflow"

    # curves streamed during training: one point per logging step, from rank 0 only (2 processes trained)
    history = {k: client.get_metric_history(run_id, k) for k in ("train/loss", "eval/loss", "train/learning_rate",
                                                                 "train/grad_norm", "train/tokens_per_s", "system/ram_used_gb")}
    assert [m.step for m in history["train/loss"]] == _expected_steps(LOGGING_STEPS, first=True)
    assert [m.step for m in history["eval/loss"]] == _expected_steps(EVAL_STEPS, first=False)
    for key in ("train/learning_rate", "train/grad_norm", "train/tokens_per_s", "system/ram_used_gb"):
        assert [m.step for m in history[key]] == _expected_steps(LOGGING_STEPS, first=True), key
    summary = json.loads(Path(result.tuned_model.download()).parent.joinpath("train_summary.json").read_text())
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert [m.value for m in history["train/loss"]] == pytest.approx(losses)

    # final metrics: base vs tuned vs the int8 variant, as the workflow returned them
    metrics = run.data.metrics
    assert metrics["base/loss"] == pytest.approx(result.base_metrics.loss)
    assert metrics["tuned/loss"] == pytest.approx(result.tuned_metrics.loss)
    assert metrics["tuned/exact_match"] == pytest.approx(result.tuned_metrics.exact_match)
    (variant,) = result.quantized_metrics
    assert metrics["int8/loss"] == pytest.approx(variant.metrics.loss)
    assert metrics["int8/loss_delta"] == pytest.approx(variant.loss_delta)

    # artifacts and tags: summary JSON, model card, revisions, execution id; the URI's password redacted
    arts = {a.path for folder in ("summary", "model_card", "train") for a in client.list_artifacts(run_id, folder)}
    assert arts == {"summary/summary.json", "model_card/README.md", "train/train_summary.json"}
    local = Path(client.download_artifacts(run_id, "summary/summary.json", str(isolated_flyte)))
    # the artifacts are plain files beside the database, wherever the task ran
    assert run.info.artifact_uri == (store / "mlartifacts" / run_id / "artifacts").as_uri()
    assert (store / "mlartifacts" / run_id / "artifacts" / "model_card" / "README.md").is_file()
    assert json.loads(local.read_text())["tuned_metrics"]["loss"] == pytest.approx(result.tuned_metrics.loss)
    tags = run.data.tags
    assert tags["flyte.execution_id"] == run.info.run_name and tags["team"] == "nlp"
    # revisions pinned by validate_config: the data file's own sha256 (as sha256sum prints it), the model dir's digest
    assert tags["data.revision"] == "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest() == params["data.revision"]
    assert tags["base_model.revision"] == params["model.revision"] and tags["base_model.revision"].startswith("sha256:")
    assert tags["hub.urls"] == "(not published)" and tags["mirror"] == "https://***@example.org/x"

    # the run and how to open it are on the train and summary decks and in the printout
    printed = capfd.readouterr()
    for deck in ("train", "summary"):
        text = (isolated_flyte / "decks" / f"{deck}.html").read_text()
        assert run_id in text and f"<code>mlflow ui --backend-store-uri {uri}</code>" in text, deck
    where = f"{uri} (experiment {exp.experiment_id}, run {run_id})"
    assert f"tracking:    mlflow {where}\n               open it: mlflow ui --backend-store-uri {uri}\n" in printed.out
    assert f"finished: {where}; open it: mlflow ui --backend-store-uri {uri}" in printed.out

    # an identical second run: training comes from the cache (same key despite a new run id), and the new
    # run still gets the curves, replayed from the cached training's summary
    again = fine_tune(config=cfg)
    assert again.tuned_model.path == result.tuned_model.path
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 2 and runs[0].info.run_id != run_id
    second = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(second, "train/loss")] == _expected_steps(LOGGING_STEPS, first=True)
    assert runs[0].data.tags["train.source"] == f"cached result of run {run_id}"
    assert runs[0].data.metrics["tuned/loss"] == pytest.approx(result.tuned_metrics.loss)

    printed = capfd.readouterr()
    leaks = _grep(store, WANDB_SECRET, HF_SECRET, URI_PASSWORD) + _grep(isolated_flyte / "decks", WANDB_SECRET, HF_SECRET)
    assert not leaks
    assert not any(s in printed.out + printed.err for s in (WANDB_SECRET, HF_SECRET, URI_PASSWORD))


@pytest.mark.slow
def test_sft_then_dpo_streams_both_stages_into_one_mlflow_run(isolated_flyte, tiny, data, secrets, no_file_store,
                                                                monkeypatch, tmp_path):
    """The DPO stage after SFT streams its curves into the execution's run, under dpo/ and after SFT's steps."""
    from mlflow import MlflowClient

    from llm_finetune.data import iso_dates_preference
    from workflows.fine_tune import fine_tune

    monkeypatch.chdir(isolated_flyte)
    pairs = tmp_path / "pairs_160.jsonl"
    pairs.write_text("\n".join(iso_dates_preference.SHIPPED_FILE.read_text().splitlines()[:160]) + "\n")
    dpo_steps, dpo_logging, dpo_eval = 4, 2, 2
    base = _config(tiny, data, {"backend": "mlflow"}, variants=()).to_dict()
    cfg = from_dict(FineTuneConfig, {**base, "preference": {
        "enabled": True,
        "data": {"source": str(pairs), "format": "preference", "eval_fraction": 0.2, "max_length": 128},
        "train": {"method": "dpo", "max_steps": dpo_steps, "logging_steps": dpo_logging, "eval_steps": dpo_eval,
                  "save_steps": dpo_eval, "eval_max_samples": 8, "sample_prompts": 1, "sample_max_new_tokens": 4,
                  "per_device_batch_size": 4, "learning_rate": 5e-4},
    }})
    result = fine_tune(config=cfg)
    # after DPO the SFT task is scored too: base, SFT and SFT+DPO on its own test split, beside the pairs' accuracy
    assert result.tuned_metrics.task_metric == "preference_accuracy"
    assert list(result.sft_task_metrics) == ["base", "SFT", "SFT+DPO"]
    assert all(m.task_metric == "exact_match" and m.exact_match_rows > 0 for m in result.sft_task_metrics.values())
    assert result.sft_task_metrics["SFT"].loss < result.sft_task_metrics["base"].loss  # SFT learned its task

    client = MlflowClient(tracking_uri=f"sqlite:///{isolated_flyte / 'runs' / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "flyte-llm-finetune"]
    (run,) = client.search_runs([exp.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    steps = lambda key: [m.step for m in client.get_metric_history(run_id, key)]  # noqa: E731
    # SFT as before; DPO after SFT's last step, its own names, one point per logging step
    assert steps("train/loss") == _expected_steps(LOGGING_STEPS, first=True)
    dpo_logged = sorted({1, *range(dpo_logging, dpo_steps + 1, dpo_logging)})
    assert steps("dpo/train/loss") == [MAX_STEPS + s for s in dpo_logged]
    assert steps("dpo/eval/loss") == [MAX_STEPS + s for s in range(dpo_eval, dpo_steps + 1, dpo_eval)]
    assert steps("dpo/train/rewards/margins") == [MAX_STEPS + s for s in dpo_logged]
    dpo_summary = json.loads(Path(result.tuned_model.download()).parent.joinpath("train_summary.json").read_text())
    assert dpo_summary["method"].startswith("dpo") and dpo_summary["steps"] == dpo_steps
    dpo_losses = [h["loss"] for h in dpo_summary["log_history"] if "loss" in h]
    assert [m.value for m in client.get_metric_history(run_id, "dpo/train/loss")] == pytest.approx(dpo_losses)
    assert run.data.metrics["dpo/run/final_loss"] == pytest.approx(dpo_summary["final_loss"])
    arts = {a.path for folder in ("train", "dpo") for a in client.list_artifacts(run_id, folder)}
    assert arts == {"train/train_summary.json", "dpo/train_summary.json"}

    # an identical second run: both stages come from the cache, and their curves are replayed the same way
    fine_tune(config=cfg)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 2
    second, tags = runs[0].info.run_id, runs[0].data.tags
    assert tags["train.source"] == tags["dpo.source"] == f"cached result of run {run_id}"
    assert [m.step for m in client.get_metric_history(second, "dpo/train/loss")] == [MAX_STEPS + s for s in dpo_logged]
    assert [m.step for m in client.get_metric_history(second, "train/loss")] == _expected_steps(LOGGING_STEPS, first=True)


# ------------------------------------------------------------------------------------------------ W&B


@pytest.mark.slow
def test_workflow_run_tracked_in_wandb_offline(isolated_flyte, tiny, data, secrets, monkeypatch, capfd):
    """WANDB_MODE=offline: the run's files, read back with W&B's own protobuf records."""
    from tests.wandb_offline import read_run

    monkeypatch.chdir(isolated_flyte)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(isolated_flyte / "wb"))
    cfg = _config(tiny, data, {"backend": "wandb", "project": "iso-dates", "tags": {"team": "nlp"}}, variants=())
    result = fine_tune_once(cfg)

    folder = isolated_flyte / "wb" / "wandb"
    run_ids = {p.name.rsplit("-", 1)[1] for p in folder.glob("offline-run-*")}
    assert len(run_ids) == 1  # start, training (rank 0 only) and finish are sessions of one run
    (run_id,) = run_ids
    run = read_run(folder, run_id)
    assert len(run["files"]) == 3
    assert run["name"].startswith("local-")
    assert run["config"]["train.max_steps"] == str(MAX_STEPS) and run["config"]["model.base_model"] == str(tiny)

    rows = run["history"]
    assert [r["_step"] for r in rows if "train/loss" in r] == _expected_steps(LOGGING_STEPS, first=True)
    assert [r["_step"] for r in rows if "eval/loss" in r] == _expected_steps(EVAL_STEPS, first=False)
    assert all("system/ram_used_gb" in r and "train/learning_rate" in r for r in rows if "train/loss" in r)

    s = run["summary"]
    assert s["base/loss"] == pytest.approx(result.base_metrics.loss)
    assert s["tuned/loss"] == pytest.approx(result.tuned_metrics.loss)
    assert {"flyte.execution_id:" + run["name"], "team:nlp"} <= run["tags"]
    assert {a.type for a in run["artifacts"]} == {"train", "summary", "model_card"}

    printed = capfd.readouterr()
    assert run_id in (isolated_flyte / "decks" / "summary.html").read_text()
    assert not _grep(isolated_flyte / "wb", WANDB_SECRET, HF_SECRET)
    assert WANDB_SECRET not in printed.out + printed.err


def fine_tune_once(cfg):
    from workflows.fine_tune import fine_tune

    return fine_tune(config=cfg)


# ------------------------------------------------------------------------------------------------ failures


@pytest.mark.slow
def test_tracker_failing_mid_run_never_stops_training(tiny, tmp_path, no_file_store, monkeypatch, capfd):
    """The real MLflow client on a local store accepts the first logs, then the 'server' goes away.

    The store is a plain folder, the user's explicit choice: it still works (the client allows it itself)."""
    import mlflow
    import pandas as pd

    from llm_finetune.config import DataConfig, TrackingConfig, TrainConfig
    from llm_finetune.tracking import TrackingCallback, open_command, start_run
    from llm_finetune.training.harness import train

    run = start_run(TrackingConfig(backend="mlflow", uri=str(tmp_path / "mlruns")), "mid-run-failure", {"a": "1"}, {})
    assert run.run_id and run.url == f"{(tmp_path / 'mlruns').as_uri()}/{run.url.split('/')[-2]}/{run.run_id}"
    assert open_command(run) == f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {tmp_path / 'mlruns'}"
    calls = {"n": 0}
    real = mlflow.MlflowClient.log_batch

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise ConnectionError("connection refused by 127.0.0.1:5000")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", flaky)
    rows = [{"messages": json.dumps([{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]),
             "text": ""} for i in range(32)]
    cfg = TrainConfig(weights="full", max_steps=6, logging_steps=1, eval_steps=0, save_steps=0, warmup_ratio=0.0)
    callback = TrackingCallback(run)
    out = train(tiny, pd.DataFrame(rows), DataConfig(max_length=64), cfg, tmp_path / "out", callbacks=(callback,))
    callback.tracker.close("finished")
    assert out.summary.steps == 6  # trained to the end

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", real)
    history = mlflow.MlflowClient(tracking_uri=str(tmp_path / "mlruns")).get_metric_history(run.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]  # what was sent before the failure is kept
    err = capfd.readouterr().err
    assert "[tracking] WARNING: mlflow log_metrics failed (ConnectionError" in err and "training goes on" in err


def test_unreachable_tracking_server_leaves_the_execution_untracked(tmp_path, capfd, monkeypatch):
    from llm_finetune.config import TrackingConfig
    from llm_finetune.tracking import resume_run, start_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run = start_run(TrackingConfig(backend="mlflow", uri="http://127.0.0.1:9"), "down", {"a": "1"}, {})
    assert run.backend == "mlflow" and run.run_id == ""
    assert resume_run(run) is None
    assert "could not start a mlflow run at http://127.0.0.1:9" in capfd.readouterr().err


# ------------------------------------------------------------------------------------------------ local MLflow store


def test_local_mlflow_store_is_sqlite_and_says_how_to_open_it(tmp_path, monkeypatch):
    """Empty uri: runs/mlflow.db (absolute, so every task shares it); the user's own choices are kept."""
    from llm_finetune.tracking import TrackedRun, mlflow_uri, open_command, tracking_html

    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert mlflow_uri("") == mlflow_uri("  ") == db
    assert mlflow_uri("sqlite:///runs/mlflow.db") == db  # relative file: made absolute
    assert mlflow_uri("sqlite:////srv/m.db") == "sqlite:////srv/m.db"
    assert mlflow_uri("mlruns") == str(tmp_path / "mlruns")  # a folder: the file store, absolute as before
    for kept in ("file:///srv/mlruns", "http://mlflow:5000", "databricks", "postgresql://u@db/mlflow"):
        assert mlflow_uri(kept) == kept

    run = lambda uri: TrackedRun("mlflow", "abc123", f"{uri} (experiment 1, run abc123)", "p", uri)  # noqa: E731
    assert open_command(run(db)) == f"mlflow ui --backend-store-uri {db}"
    assert f"Open it with <code>mlflow ui --backend-store-uri {db}</code>" in tracking_html(run(db))
    # the folder store still works, but MLflow 3 opens it only when allowed: the command says so
    folder = str(tmp_path / "mlruns")
    assert open_command(run(folder)) == f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {folder}"
    assert open_command(run("file:///srv/mlruns")).startswith("MLFLOW_ALLOW_FILE_STORE=true mlflow ui")
    for remote in ("http://mlflow:5000", "databricks"):
        assert open_command(run(remote)) == "" and "Open it" not in tracking_html(run(remote))
    assert open_command(TrackedRun("wandb", "abc", "https://wandb.ai/x", "p", "")) == ""


def _store_worker(job: tuple) -> tuple[str, int]:
    """One process of the concurrency test (top level, so a spawned process can run it)."""
    import os

    from llm_finetune.config import TrackingConfig
    from llm_finetune.tracking import TrackedRun, Tracker, start_run

    what, cwd, arg = job
    os.chdir(cwd)
    if what == "start":  # a new database: every process creates the tables and the experiment at once
        run = start_run(TrackingConfig(backend="mlflow"), f"start-{arg}", {"i": str(arg)}, {"w": str(arg)})
        return run.run_id, 0
    run, i = TrackedRun(**arg[0]), arg[1]
    tracker = Tracker(run)
    for step in range(1, 31):
        tracker.log_metrics({f"w{i}/loss": 1.0 / step, "shared/x": float(i)}, step)
    tracker.set_tags({f"w{i}": "done"})
    artifact = Path(cwd) / f"w{i}.json"
    artifact.write_text(json.dumps({"i": i}))
    tracker.log_artifact(artifact, "workers")
    tracker.close("suspended")
    return run.run_id, tracker.failures


@pytest.mark.slow
def test_local_sqlite_store_takes_several_processes_at_once(tmp_path, no_file_store):
    """Rank 0 of training and the other tasks may write at the same time: SQLite's locking serializes them
    (nothing is lost), and the first use of a new database is serialized by a lock file."""
    import multiprocessing
    import os

    from mlflow import MlflowClient

    n = 3
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        started = pool.map(_store_worker, [("start", str(tmp_path), i) for i in range(n)])
        run_ids = [r for r, _ in started]
        assert all(run_ids) and len(set(run_ids)) == n
        uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
        # the first run, as a TrackedRun's fields, to every process
        run = {"backend": "mlflow", "run_id": run_ids[0], "url": "", "project": "flyte-llm-finetune", "uri": uri}
        logged = pool.map(_store_worker, [("log", str(tmp_path), (run, i)) for i in range(n)])
    assert [failures for _, failures in logged] == [0] * n

    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    client = MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "flyte-llm-finetune"]
    assert exp.artifact_location == (tmp_path / "runs" / "mlartifacts").as_uri()
    assert {r.info.run_id for r in client.search_runs([exp.experiment_id])} == set(run_ids)
    got = client.get_run(run_ids[0])
    for i in range(n):
        assert [m.step for m in client.get_metric_history(run_ids[0], f"w{i}/loss")] == list(range(1, 31))
        assert got.data.tags[f"w{i}"] == "done"
    assert len(client.get_metric_history(run_ids[0], "shared/x")) == 30 * n
    assert {a.path for a in client.list_artifacts(run_ids[0], "workers")} == {f"workers/w{i}.json" for i in range(n)}

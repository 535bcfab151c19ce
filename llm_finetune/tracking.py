"""Experiment tracking in MLflow or Weights & Biases: one tracked run per workflow execution.

Training, evaluation and the report run as separate Flyte tasks (separate pods), so the run
is created once, at the start of the workflow (``start_run``), and every later task resumes
it by id (``resume_run``): rank 0 of training streams the curves (``TrackingCallback``), the
last task logs the base/tuned/variant metrics, the summary JSON and the model card and ends
the run. ``TrackedRun`` is what travels between the tasks.

A tracker never stops a run. ``Tracker`` sends every call through one background thread;
a failure (server down, network error, bad credentials) is printed as a warning and
training goes on; ``close`` waits a bounded time for what is still queued.

Secrets: the W&B API key goes to wandb's own settings, never to a param, tag or artifact;
credentials written inside a URI (``https://user:pass@host``) are redacted from everything logged. No flytekit here: the Flyte wrappers are in tasks/tracking.py.
"""

from __future__ import annotations

import html
import json
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import TrainerCallback

from llm_finetune.config import TrackingConfig

DEFAULT_PROJECT = "flyte-llm-finetune"
# Empty tracking.uri with backend mlflow: a local SQLite store (MLflow 3 keeps the plain-folder store in maintenance
# mode and refuses to open it without MLFLOW_ALLOW_FILE_STORE=true), its artifacts as plain files in a folder beside it.
LOCAL_MLFLOW_DB = Path("runs/mlflow.db")
MLFLOW_ARTIFACTS_DIR = "mlartifacts"  # beside a local SQLite store: runs/mlartifacts/<run id>/artifacts/
LOCAL_WANDB_DIR = Path("runs")  # wandb writes runs/wandb/(offline-)run-*/ (WANDB_DIR overrides it)


@dataclass
class TrackedRun:
    """The run every task of one execution logs to; ``run_id`` empty = no tracking."""

    backend: str = "none"
    run_id: str = ""
    url: str = ""  # where a person opens it (tracking UI, or the local folder)
    project: str = ""
    uri: str = ""  # MLflow tracking URI (absolute for the local store) / W&B server URL
    # A later training stage of the same execution (SFT then DPO): its curves go under ``<stage>/`` and
    # after the earlier stage's steps, so the names do not mix and W&B's step stays monotonic.
    stage: str = ""
    step_offset: int = 0

    def for_stage(self, stage: str, step_offset: int) -> "TrackedRun":
        return replace(self, stage=stage, step_offset=step_offset)


def redact_uri(text: str) -> str:
    """``scheme://user:password@host/...`` -> ``scheme://***@host/...`` (credentials never reach a tracker)."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", text)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///<path>`` MLflow store (None for any other URI or an in-memory one)."""
    if not uri.startswith("sqlite:///") or uri.split("?", 1)[0] in ("sqlite:///", "sqlite:///:memory:"):
        return None
    return Path(uri.split("?", 1)[0].removeprefix("sqlite:///"))


def is_file_store(uri: str) -> bool:
    """MLflow's plain-folder store (a path or a ``file:`` URI): it opens only with MLFLOW_ALLOW_FILE_STORE=true."""
    return uri.startswith("file:") or ("://" not in uri and not uri.startswith(("sqlite:", "databricks")))


def mlflow_uri(uri: str) -> str:
    """The tracking URI every task of an execution uses: empty -> the local SQLite store ``runs/mlflow.db``;
    a relative database file or folder -> absolute, so tasks started in other directories share the store."""
    uri = uri.strip()
    if not uri:
        return f"sqlite:///{LOCAL_MLFLOW_DB.expanduser().resolve()}"
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        rest = uri.split("?", 1)[1] if "?" in uri else ""
        return f"sqlite:///{db.expanduser().resolve()}" + (f"?{rest}" if rest else "")
    if is_file_store(uri) and not uri.startswith("file:"):  # a plain folder (the file store): absolute
        return str(Path(uri).expanduser().resolve())
    return uri


def open_command(run: TrackedRun) -> str:
    """The shell command that opens a run kept in a local MLflow store (``mlflow ui``, from the full ``mlflow``
    package); empty for a tracking server, W&B or no tracking."""
    if run.backend != "mlflow" or not run.uri:
        return ""
    if sqlite_path(run.uri) is not None:
        return f"mlflow ui --backend-store-uri {run.uri}"
    if is_file_store(run.uri):  # the user's choice of the folder store: MLflow 3 opens it only when allowed
        return f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {run.uri}"
    return ""


def wandb_offline() -> bool:
    return os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "dryrun", "disabled")


def tracking_problems(cfg: TrackingConfig, wandb_api_key: str, remote: bool) -> list[str]:
    """What keeps the configured tracker from working, checked before any training.

    ``wandb_api_key``: the value of the Flyte Secret (or WANDB_API_KEY locally); ``remote``:
    running on a cluster, where a local store inside a pod would vanish with the pod.
    """
    p = []
    if cfg.backend == "wandb" and not wandb_api_key.strip() and not wandb_offline():
        p.append(
            "tracking.backend: wandb needs an API key: create the Flyte secret wandb/api_key "
            "(kubectl create secret generic wandb --from-literal=api_key=...; locally export WANDB_API_KEY), "
            "or set WANDB_MODE=offline to write the run to local files"
        )
    if cfg.backend == "mlflow" and remote and not cfg.uri.strip():
        p.append(
            "tracking.uri: empty, so MLflow would write to a local store inside the task's pod, which is deleted with "
            "it; set tracking.uri to your tracking server, e.g. http://mlflow.mlflow.svc:5000"
        )
    return p


def redacted(tree):
    """A copy of a config dict with credentials inside URIs redacted (for model cards and artifacts)."""
    if isinstance(tree, dict):
        return {k: redacted(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redacted(v) for v in tree]
    return redact_uri(tree) if isinstance(tree, str) else tree


def config_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as flat params: ``{"train": {"lora": {"r": 16}}}`` -> ``{"train.lora.r": "16"}``.

    Lists are JSON; credentials inside URIs are redacted.
    """
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(config_params(v, key + "."))
        elif isinstance(v, (list, dict)):
            out[key] = json.dumps(v)
        else:
            out[key] = redact_uri(str(v))
    return out


# --------------------------------------------------------------------------------------- backends


class _Mlflow:
    """MLflow through ``MlflowClient`` (explicit run ids; no global active run, safe across tasks)."""

    def __init__(self, uri: str):
        if is_file_store(uri):
            # an explicitly chosen plain-folder store: in maintenance mode in MLflow 3, refused unless allowed
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # a down server must not hold a training step for minutes: few retries, short timeouts
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow import MlflowClient

        self.uri = uri
        self.db = sqlite_path(uri)
        if self.db is None:
            self.client = MlflowClient(tracking_uri=uri)
        else:
            # the first client on a new database creates its tables; two processes doing that at once collide
            # ("table ... already exists"), so that step is serialized. After it, SQLite's own locking (MLflow
            # sets a 20 s busy timeout) lets several processes log to the store at the same time.
            from filelock import FileLock

            self.db.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.db) + ".lock"):
                self.client = MlflowClient(tracking_uri=uri)
        self.run_id = ""

    def create(self, project: str, run_name: str, tags: dict[str, str]) -> tuple[str, str]:
        exp = self.client.get_experiment_by_name(project)
        exp_id = exp.experiment_id if exp is not None else self._create_experiment(project)
        run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id, self._url(exp_id)

    def _create_experiment(self, project: str) -> str:
        # a local SQLite store keeps the artifacts as plain files beside it (MLflow's default, ./mlruns, would
        # depend on each task's working directory)
        location = None if self.db is None else (self.db.parent / MLFLOW_ARTIFACTS_DIR).as_uri()
        try:
            return self.client.create_experiment(project, artifact_location=location)
        except Exception:  # another execution created it meanwhile
            exp = self.client.get_experiment_by_name(project)
            if exp is None:
                raise
            return exp.experiment_id

    def _url(self, exp_id: str) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"{redact_uri(self.uri.rstrip('/'))}/#/experiments/{exp_id}/runs/{self.run_id}"
        if is_file_store(self.uri) and not self.uri.startswith("file:"):  # a local folder store: the run's folder
            return f"{Path(self.uri).as_uri()}/{exp_id}/{self.run_id}"
        return f"{redact_uri(self.uri)} (experiment {exp_id}, run {self.run_id})"

    def resume(self, run_id: str) -> None:
        self.run_id = run_id
        if self.client.get_run(run_id).info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100], synchronous=True)

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items, synchronous=True)

    def summary(self, metrics: dict[str, float]) -> None:
        self.metrics(metrics, step=0)

    def tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def artifact(self, path: str, folder: str) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path=folder or None)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "finished" else "FAILED")

    def suspend(self) -> None:
        pass  # MLflow keeps the run RUNNING between tasks; nothing is held open


class _Wandb:
    """W&B with ``wandb.init(id=..., resume="allow")``: each task is a session of the same run."""

    def __init__(self, uri: str, api_key: str):
        import wandb

        self.wandb, self.uri, self.api_key, self.run = wandb, uri, api_key, None

    def _init(self, project: str, run_id: str | None, run_name: str | None, tags: list[str] | None, group: str | None = None):
        fields = {"silent": True, "x_disable_stats": True}  # the resource profiler's memory is logged instead
        if self.api_key:
            fields["api_key"] = self.api_key
        if self.uri:
            fields["base_url"] = self.uri
        if wandb_offline():
            fields["mode"] = "offline"
        settings = self.wandb.Settings(**fields)
        wandb_dir = Path(os.environ.get("WANDB_DIR", LOCAL_WANDB_DIR))
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(
            project=project, id=run_id, name=run_name, tags=tags, resume="allow", dir=str(wandb_dir),
            settings=settings, reinit="create_new", group=group,
        )

    def create(self, project: str, run_name: str, tags: dict[str, str]) -> tuple[str, str]:
        # W&B caps tags at 64 chars; a sweep trial's run is grouped under the execution's run (its group)
        self._init(project, None, run_name, [f"{k}:{v}"[:64] for k, v in tags.items() if k != PARENT_TAG],
                   group=tags.get(PARENT_TAG))
        self.run.config.update({"tags": tags}, allow_val_change=True)
        url = None if wandb_offline() else self.run.url  # offline runs have no URL until `wandb sync`
        return self.run.id, url or str(Path(self.run.dir).parent)

    def resume(self, run_id: str, project: str) -> None:
        self._init(project, run_id, None, None)

    def params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=int(step))

    def summary(self, metrics: dict[str, float]) -> None:
        self.run.summary.update(dict(metrics))

    def tags(self, tags: dict[str, str]) -> None:
        self.run.summary.update({f"tag/{k}": v for k, v in tags.items()})
        self.run.tags = tuple(dict.fromkeys([*(self.run.tags or ()), *(f"{k}:{v}"[:64] for k, v in tags.items())]))

    def artifact(self, path: str, folder: str) -> None:
        art = self.wandb.Artifact(name=f"{folder or 'file'}-{self.run.id}", type=folder or "file")
        art.add_file(path)
        self.run.log_artifact(art)

    def end(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)

    def suspend(self) -> None:
        self.run.finish()  # ends this task's session; the next task resumes the run by id


def _backend(run: TrackedRun, api_key: str):
    if run.backend == "mlflow":
        return _Mlflow(run.uri)
    if run.backend == "wandb":
        return _Wandb(run.uri, api_key)
    raise ValueError(f"unknown tracking backend {run.backend!r}")


# --------------------------------------------------------------------------------------- runs


def start_run(cfg: TrackingConfig, run_name: str, params: dict[str, str], tags: dict[str, str],
              api_key: str = "") -> TrackedRun:
    """Create the execution's run and log the params; a tracker that cannot be reached gives a warning
    and an untracked execution (``run_id`` empty), never a failed one."""
    if cfg.backend == "none":
        return TrackedRun()
    project = cfg.project or DEFAULT_PROJECT
    uri = mlflow_uri(cfg.uri) if cfg.backend == "mlflow" else cfg.uri.strip()
    ref = TrackedRun(backend=cfg.backend, project=project, uri=uri)
    all_tags = {**{k: redact_uri(str(v)) for k, v in cfg.tags.items()}, **tags}
    try:
        backend = _backend(ref, api_key)
        ref.run_id, ref.url = backend.create(project, cfg.run_name or run_name, all_tags)
        backend.params(params)
        backend.suspend()
    except Exception as e:  # noqa: BLE001 - any tracker failure: warn, never fail the run
        _warn(f"could not start a {cfg.backend} run at {redact_uri(uri) or 'the default server'} "
              f"({type(e).__name__}: {redact_uri(str(e))[:300]}); this execution is not tracked")
        return TrackedRun(backend=cfg.backend, project=project, uri=uri)
    return ref


# the tag naming the execution's run on a sweep trial's run: MLflow nests a run under the run this tag names
# in its UI; W&B runs are grouped by it
PARENT_TAG = "mlflow.parentRunId"


def start_child_run(parent: TrackedRun, run_name: str, params: dict[str, str], tags: dict[str, str],
                    api_key: str = "") -> TrackedRun:
    """A run nested under ``parent`` (a sweep trial's, under the execution's), in the same project; an
    untracked ``TrackedRun`` (with a warning) when the parent is untracked or the tracker fails."""
    if parent.backend == "none" or not parent.run_id:
        return TrackedRun()
    child = TrackedRun(backend=parent.backend, project=parent.project, uri=parent.uri)
    try:
        backend = _backend(child, api_key)
        child.run_id, child.url = backend.create(parent.project, run_name, {**tags, PARENT_TAG: parent.run_id})
        backend.params(params)
        backend.suspend()
    except Exception as e:  # noqa: BLE001 - tracking never fails a run
        _warn(f"could not start the {parent.backend} run {run_name!r} ({type(e).__name__}: {redact_uri(str(e))[:300]}); "
              "it is not tracked")
        return TrackedRun()
    return child


def finish_child_run(run: TrackedRun, summary: dict[str, float], history: list[dict], replay: bool,
                     api_key: str = "") -> None:
    """End a sweep trial's run with its summary; ``replay``: its training streamed elsewhere (it came from
    the cache), so its curves are logged here first."""
    tracker = resume_run(run, api_key)
    if tracker is None:
        return
    if replay:
        log_history(tracker, history)
        tracker.set_tags({"train.source": "cached result"})
    tracker.log_summary(summary)
    tracker.close("finished")


def resume_run(run: TrackedRun, api_key: str = "") -> "Tracker | None":
    """The run of this execution, resumed in this process; None when the execution is not tracked."""
    if run.backend == "none" or not run.run_id:
        return None
    return Tracker(run, api_key)


def _warn(message: str) -> None:
    print(f"[tracking] WARNING: {message}", file=sys.stderr, flush=True)


class Tracker:
    """A resumed run whose calls run on one background thread; failures become warnings."""

    def __init__(self, run: TrackedRun, api_key: str = "", close_timeout_s: float = 120.0):
        self.run, self.close_timeout_s = run, close_timeout_s
        self.failures = 0
        self._api_key = api_key
        self._queue: queue.Queue = queue.Queue()
        self._backend = None
        self._thread = threading.Thread(target=self._work, name="tracking", daemon=True)
        self._thread.start()
        self._submit("resume", self._resume)

    def _resume(self) -> None:
        backend = _backend(self.run, self._api_key)
        if self.run.backend == "wandb":
            backend.resume(self.run.run_id, self.run.project)
        else:
            backend.resume(self.run.run_id)
        self._backend = backend

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            what, fn = item
            try:
                if what != "resume" and self._backend is None:
                    raise RuntimeError("the run could not be resumed")
                fn()
            except Exception as e:  # noqa: BLE001 - tracking never stops training
                self.failures += 1
                if self.failures <= 3:
                    _warn(f"{self.run.backend} {what} failed ({type(e).__name__}: {redact_uri(str(e))[:300]}); "
                          "training goes on" + ("; further failures are counted, not printed" if self.failures == 3 else ""))
            finally:
                self._queue.task_done()

    def _submit(self, what: str, fn) -> None:
        self._queue.put((what, fn))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        if clean:
            self._submit("log_metrics", lambda: self._backend.metrics(clean, step))

    def log_summary(self, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        if clean:
            self._submit("log_summary", lambda: self._backend.summary(clean))

    def log_params(self, params: dict[str, str]) -> None:
        self._submit("log_params", lambda: self._backend.params(params))

    def set_tags(self, tags: dict[str, str]) -> None:
        clean = {k: redact_uri(str(v)) for k, v in tags.items()}
        self._submit("set_tags", lambda: self._backend.tags(clean))

    def log_artifact(self, path: str | Path, folder: str = "") -> None:
        self._submit("log_artifact", lambda: self._backend.artifact(str(path), folder))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued is sent (or ``timeout_s`` passes); True when the queue drained."""
        deadline = time.monotonic() + (self.close_timeout_s if timeout_s is None else timeout_s)
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._queue.unfinished_tasks

    def close(self, status: str = "suspended") -> None:
        """``suspended``: this task is done, a later one resumes; ``finished`` / ``failed``: end the run."""
        if status == "suspended":
            self._submit("suspend", lambda: self._backend.suspend())
        else:
            self._submit("end", lambda: self._backend.end(status))
        self._queue.put(None)
        if not self.flush():
            _warn(f"{self._queue.unfinished_tasks} tracking update(s) still unsent after {self.close_timeout_s:.0f}s; "
                  "dropped so the task can finish")
        elif self.failures:
            _warn(f"{self.failures} tracking call(s) failed in this task; the run in {self.run.backend} is incomplete")


def tracking_html(run: TrackedRun) -> str:
    """The deck section that links the Flyte console to the tracked run."""
    if run.backend == "none":
        return "<p>Not tracked (tracking.backend: none).</p>"
    if not run.run_id:
        return f"<p>{html.escape(run.backend)}: the run could not be created (see the start_tracking log); not tracked.</p>"
    url = html.escape(run.url)
    link = f"<a href='{url}' target='_blank'>{url}</a>" if run.url.startswith(("http://", "https://", "file://")) else url
    command = open_command(run)
    extra = f"<p>Open it with <code>{html.escape(command)}</code> (the full mlflow package).</p>" if command else ""
    return (f"<p>{html.escape(run.backend)} run <b>{html.escape(run.run_id)}</b> in project "
            f"<b>{html.escape(run.project)}</b>: {link}</p>{extra}")


# --------------------------------------------------------------------------------------- training


def metric_name(key: str, stage: str = "") -> str:
    """The Trainer's log keys as tracker metric names: ``loss`` -> ``train/loss``, ``eval_loss`` -> ``eval/loss``;
    a later stage's under its name (``dpo/train/loss``)."""
    if key.startswith("eval_"):
        name = "eval/" + key[len("eval_"):]
    elif key == "train_loss":  # the Trainer's mean over the whole run, not a point of the loss curve
        name = "train/mean_loss"
    else:
        name = "train/" + key.removeprefix("train_")
    return f"{stage}/{name}" if stage else name


def log_history(tracker: "Tracker", history: list[dict], stage: str = "", step_offset: int = 0) -> int:
    """Log the Trainer's ``log_history`` entries (each with its ``step``); returns how many were logged."""
    n = 0
    for entry in history:
        step = entry.get("step")
        metrics = {metric_name(k, stage): v for k, v in entry.items() if k != "step"}
        if step is not None and metrics:
            tracker.log_metrics(metrics, int(step) + step_offset)
            n += 1
    return n


class TrackingCallback(TrainerCallback):
    """Streams every Trainer log (loss, validation loss, learning rate, grad norm, trained tokens/s) and the
    node's memory to the execution's run, from global rank 0 only; the other ranks never open the tracker."""

    def __init__(self, run: TrackedRun, api_key: str = ""):
        self.run, self._api_key = run, api_key
        self.tracker: Tracker | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.tracker is None:
            self.tracker = resume_run(self.run, self._api_key)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.tracker is None or not state.is_world_process_zero or not logs:
            return
        from llm_finetune.training.resources import memory_snapshot

        metrics = {metric_name(k, self.run.stage): v for k, v in logs.items()}
        if "loss" in logs:  # a training log: the node's memory at the same step
            metrics.update({f"system/{k}": v for k, v in memory_snapshot().items()})
        self.tracker.log_metrics(metrics, state.global_step + self.run.step_offset)

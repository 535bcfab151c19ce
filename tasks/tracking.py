"""Tracking tasks: create the execution's MLflow / W&B run first, complete and end it last.

``start_tracking`` runs right after ``validate_config`` and returns a ``TrackedRun`` (backend,
run id, URL): later tasks resume the run by that id. The cached tasks that take it
(``train_model``) list it in ``Cache(ignored_inputs=...)``, so a new run id never invalidates
their cache. When training is served from the cache, ``finish_tracking`` logs the cached
run's curves from its ``train_summary.json`` into this execution's run, so every run holds
its curves either way.

The W&B API key is the Flyte Secret wandb/api_key (WANDB_API_KEY locally): never an input,
so it is not in the execution's inputs, outputs, decks or cache keys.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from flytekit import current_context, task

from images.specs import cpu_image
from llm_finetune.config import FineTuneConfig, TrackingConfig
from llm_finetune.errors import ConfigError
from llm_finetune.tracking import (
    TrackedRun,
    config_params,
    log_history,
    open_command,
    redact_uri,
    redacted,
    resume_run,
    start_run,
    tracking_problems,
)
from tasks.common import WANDB_SECRET, is_local, wandb_api_key, write_run_file
from flytekit.types.file import FlyteFile

from tasks.result import FineTuneResult
from tasks.sweep import card_section, chosen_config

def execution_name() -> str:
    """The Flyte execution id; local runs (whose id is always "local") get a timestamped one."""
    name = current_context().execution_id.name
    return f"local-{time.strftime('%Y%m%d-%H%M%S')}" if name in ("", "local") else name


def check_tracking(cfg: TrackingConfig) -> None:
    """validate_config's tracking checks that need the task's environment (secret, local or remote)."""
    problems = tracking_problems(cfg, wandb_api_key() if cfg.backend == "wandb" else "", remote=not is_local())
    if problems:
        raise ConfigError(problems)


@task(container_image=cpu_image, secret_requests=[WANDB_SECRET])
def start_tracking(config: FineTuneConfig) -> TrackedRun:
    """Create this execution's run (named after the execution id) holding the full resolved config as params."""
    cfg = config.tracking
    if cfg.backend == "none":
        return TrackedRun()
    name = execution_name()
    m, d = config.model, config.data
    tags = {"flyte.execution_id": name, "base_model": m.base_model, "dataset": redact_uri(d.source),
            "train.method": config.train.method, "train.weights": config.train.weights,
            # pinned by validate_config: the hub commit or content fingerprint this execution reads
            "base_model.revision": m.revision, "data.revision": d.revision}
    if os.environ.get("FLYTE_EXECUTION_URL"):
        tags["flyte.execution_url"] = os.environ["FLYTE_EXECUTION_URL"]
    run = start_run(cfg, name, config_params(config.to_dict()), tags, api_key=wandb_api_key() if cfg.backend == "wandb" else "")
    if run.run_id:
        print(f"[tracking] {run.backend} run {run.run_id}: {run.url}{_open_hint(run)}", flush=True)
    return run


def _open_hint(run: TrackedRun) -> str:
    """``; open it: mlflow ui --backend-store-uri ...`` for a run in a local MLflow store, else nothing."""
    command = open_command(run)
    return f"; open it: {command}" if command else ""


def _metrics(prefix: str, m) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in asdict(m).items() if isinstance(v, (int, float))}


def result_summary(result: FineTuneResult, train_summary: dict) -> dict:
    """The run's results as one JSON document (the summary artifact)."""
    return {
        "base_metrics": asdict(result.base_metrics),
        "tuned_metrics": asdict(result.tuned_metrics),
        "quantized_metrics": [
            {"variant": v.variant, "size_mb": v.size_mb, "loss_delta": v.loss_delta, "exact_match_delta": v.exact_match_delta,
             **asdict(v.metrics)} for v in result.quantized_metrics
        ],
        "benchmarks": result.benchmarks,
        "train": {k: train_summary.get(k) for k in ("method", "steps", "first_loss", "final_loss", "trained_tokens",
                                                    "tokens_per_s", "runtime_s", "world_size", "best_step", "best_eval_loss")},
        "tuned_model": str(result.tuned_model.path),
        "adapter": str(result.adapter.path) if result.adapter else "",
        "quantized": {q.variant: str(q.model.path) for q in result.quantized},
        "hub_urls": list(result.hub_urls),
    }


def _stage_summary(tracker, run: TrackedRun, metrics: FlyteFile, tracked_run_id: str, folder: str, stage: str,
                   step_offset: int) -> dict:
    """A training stage's train_summary.json; if the stage came from the cache (or was not tracked), its
    curves are replayed into this run (under ``stage``, after ``step_offset``) with the file and a source tag."""
    path = metrics.download()
    summary = json.loads(Path(path).read_text())
    if tracked_run_id != run.run_id:
        n = log_history(tracker, summary.get("log_history", []), stage, step_offset)
        tracker.set_tags({f"{folder}.source": f"cached result of run {tracked_run_id or '(untracked)'}"})
        tracker.log_artifact(path, folder)
        what = f"the {stage.upper()} stage" if stage else "training"
        print(f"[tracking] {what} streamed to another run (a cached result, or a sweep trial's run): {n} logged steps "
              f"replayed into run {run.run_id}", flush=True)
    return summary


def run_model_card(config: FineTuneConfig, result: FineTuneResult) -> str:
    """The merged model's card with the execution's metrics (base, tuned, each variant): the preview a local
    run keeps in runs/<execution id>/model_card.md and the card the tracked run stores."""
    from llm_finetune.export.hub import card_metrics, model_card

    h = config.hub
    return model_card(h.repo_id or "(not published)", base_model=config.model.base_model, dataset=config.data.source,
                      config=redacted(chosen_config(config, result.sweep).to_dict()), license=h.license,
                      variant="merged model", sweep=card_section(result.sweep),
                      metrics={"base": card_metrics(result.base_metrics, result.benchmarks.get("base")),
                               "tuned": card_metrics(result.tuned_metrics, result.benchmarks.get("tuned")),
                               **{v.variant: card_metrics(v.metrics) for v in result.quantized_metrics},
                               # SFT -> DPO: the supervised task beside the pairs' preference accuracy
                               **{f"{label} (SFT task)": card_metrics(m) for label, m in result.sft_task_metrics.items()}})


@task(container_image=cpu_image, secret_requests=[WANDB_SECRET])
def finish_tracking(run: TrackedRun, config: FineTuneConfig, train_metrics: FlyteFile, tracked_run_id: str,
                    result: FineTuneResult, dpo_metrics: Optional[FlyteFile] = None, dpo_tracked_run_id: str = "") -> str:
    """Log base vs tuned vs variant metrics, the summary JSON, the model card and hub links; end the run.

    ``train_metrics`` / ``tracked_run_id``: the train task's train_summary.json and the run it streamed to;
    ``dpo_metrics`` / ``dpo_tracked_run_id``: the same for the optional DPO stage after SFT.
    Local runs also keep the card as runs/<execution id>/model_card.md, published or not (this task always
    runs; push_to_hub runs only when hub.repo_id is set).
    """
    card = run_model_card(config, result)
    card_path = write_run_file("model_card.md", card)
    if card_path is not None:
        print(f"[finish_tracking] model card preview: {card_path}", flush=True)
    tracker = resume_run(run, wandb_api_key() if run.backend == "wandb" else "")
    if tracker is None:
        return run.url
    train_summary = _stage_summary(tracker, run, train_metrics, tracked_run_id, "train", "", 0)
    dpo_summary = {} if dpo_metrics is None else _stage_summary(
        tracker, run, dpo_metrics, dpo_tracked_run_id, "dpo", "dpo", int(train_summary.get("steps", 0)))
    final = {**_metrics("base", result.base_metrics), **_metrics("tuned", result.tuned_metrics)}
    for v in result.quantized_metrics:
        final.update(_metrics(v.variant, v.metrics))
        final.update({f"{v.variant}/loss_delta": v.loss_delta, f"{v.variant}/exact_match_delta": v.exact_match_delta,
                      f"{v.variant}/size_mb": v.size_mb})
    for model, scores in result.benchmarks.items():
        final.update({f"{model}/{k}": s for k, s in scores.items()})
    for prefix, summary in (("run", train_summary), ("dpo/run", dpo_summary)):
        final.update({f"{prefix}/{k}": summary[k] for k in ("best_eval_loss", "final_loss", "trained_tokens", "tokens_per_s",
                                                            "runtime_s") if isinstance(summary.get(k), (int, float))})
    tracker.log_summary(final)
    tracker.set_tags({"hub.urls": " ".join(result.hub_urls) or "(not published)"}
                     | ({"hub.url": result.hub_url} if result.hub_url else {}))
    out = Path(tempfile.mkdtemp(prefix="tracking-"))
    (out / "summary.json").write_text(json.dumps(result_summary(result, train_summary), indent=2, default=str))
    (out / "README.md").write_text(card)
    tracker.log_artifact(out / "summary.json", "summary")
    tracker.log_artifact(out / "README.md", "model_card")
    tracker.close("finished")
    print(f"[tracking] {run.backend} run {run.run_id} finished: {run.url}{_open_hint(run)}", flush=True)
    return run.url


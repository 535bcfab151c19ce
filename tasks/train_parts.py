"""The training task's parts: the result type, the Elastic settings and resources, the deck panels
(loss curves, each method's own metrics, resources, samples) and tracking on rank 0.

Below tasks/train.py and the preference stage, which both import it (tests/test_import_graph.py).
"""

from __future__ import annotations

import contextlib
import typing
from typing import Optional

import pandas as pd
from flytekit import Cache, Resources
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from flytekitplugins.kfpytorch import Elastic

from llm_finetune.config import TrainConfig
from llm_finetune.disk import disk_gib, training_copies
from llm_finetune.tracking import TrackedRun, TrackingCallback
from tasks.common import CACHE_TRAIN, table_html, wandb_api_key


class TrainResult(typing.NamedTuple):
    """The train task's outputs, each its own Flyte output so that downstream cached tasks bind
    to them directly rather than through an attribute path (see tasks/validate.py)."""

    model: FlyteDirectory  # merged (LoRA) or fully fine-tuned model
    adapter: Optional[FlyteDirectory]  # LoRA adapter; None for full fine-tuning
    steps: int
    first_loss: float
    final_loss: float
    trained_tokens: int
    tokens_per_s: float
    runtime_s: float
    world_size: int
    best_step: int  # step of the returned checkpoint (best validation loss); -1 = last step
    best_eval_loss: float
    resumed_from_step: int  # 0 = this attempt started from scratch
    metrics: FlyteFile  # train_summary.json: log history, samples, resource profile
    tracked_run_id: str  # the MLflow / W&B run the curves were streamed to ("" = not tracked)


# train_ops (cpu, memory, retries, timeouts, intervals, ...) never changes the trained weights, so it
# is left out of the key: Flyte hashes the other inputs only (TaskMetadata.cache_ignore_input_vars,
# honoured by propeller's catalog key, flytepropeller/pkg/controller/nodes/task/cache.go).
# The tracked MLflow / W&B run is new every execution and is left out too (tasks/tracking.py).
CACHE_TRAIN_IGNORING_OPS = Cache(version=CACHE_TRAIN.version, ignored_inputs=("train_ops", "tracking"))


def elastic_config(cfg: TrainConfig) -> Elastic:
    return Elastic(
        nnodes=cfg.nnodes,
        nproc_per_node=cfg.nproc_per_node,
        max_restarts=0,  # Flyte retries the whole task (and resumes from its checkpoint) instead
        # timeout / join_timeout: how long the rendezvous waits for every node to join. read_timeout:
        # the c10d rendezvous store's per-read timeout (torch's default 60 s), which a node that joins
        # while another is still pulling a 20 GB training image would otherwise hit and fail the
        # attempt; sized like the join, so a node pulling its image on a fresh GPU node is waited for.
        rdzv_configs={"timeout": 900, "join_timeout": 900, "read_timeout": 900},
        increase_shared_mem=False,  # deprecated; shared memory is requested on the task
    )


def resources(cfg: TrainConfig, ephemeral_storage: str | None = None) -> Resources:
    """The training pod's requests (= limits): the config's CPU, memory and GPUs, and the disk sized from the model."""
    return Resources(cpu=cfg.cpu, mem=cfg.memory, gpu=cfg.gpus_per_node or None, ephemeral_storage=ephemeral_storage)


def training_disk(cfg: TrainConfig, base_model_bytes: int | None) -> str | None:
    """The training pod's ephemeral-storage request from the base model's size (llm_finetune/disk.py).

    None when the size is unknown: no request, as the pod cannot be sized (it then fits any node
    but has no disk reserved). The request is also the pod's limit, so it errs on the large side.
    """
    if base_model_bytes is None:
        return None
    return f"{disk_gib(base_model_bytes, training_copies(cfg.weights))}Gi"


def curves_html(log_history: list[dict]) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    logs = pd.DataFrame([h for h in log_history if "loss" in h])
    evals = pd.DataFrame([h for h in log_history if "eval_loss" in h])
    if logs.empty:
        return "<p>no training logs</p>"
    fig = make_subplots(rows=1, cols=3, subplot_titles=("loss", "learning rate", "trained tokens / s"))
    fig.add_trace(go.Scatter(x=logs["step"], y=logs["loss"], name="train loss"), row=1, col=1)
    if not evals.empty:
        fig.add_trace(go.Scatter(x=evals["step"], y=evals["eval_loss"], name="validation loss", mode="lines+markers"), 1, 1)
    fig.add_trace(go.Scatter(x=logs["step"], y=logs["learning_rate"], name="lr"), row=1, col=2)
    if "tokens_per_s" in logs:
        fig.add_trace(go.Scatter(x=logs["step"], y=logs["tokens_per_s"], name="tokens/s"), row=1, col=3)
    fig.update_layout(height=360)
    return fig.to_html(full_html=False, include_plotlyjs=True)


def method_curves_html(log_history: list[dict], keys: tuple[str, ...], note: str) -> str:
    """One panel per metric a method logs beside its loss (the registry's ``deck_metrics``), train and validation."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    logs = pd.DataFrame([h for h in log_history if "loss" in h])
    evals = pd.DataFrame([h for h in log_history if "eval_loss" in h])
    if logs.empty:
        return "<p>no training logs</p>"
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=keys)
    for i, key in enumerate(keys, start=1):
        if key in logs:
            fig.add_trace(go.Scatter(x=logs["step"], y=logs[key], name=f"train {key}"), row=1, col=i)
        if f"eval_{key}" in evals:
            fig.add_trace(go.Scatter(x=evals["step"], y=evals[f"eval_{key}"], name=f"validation {key}", mode="lines+markers"), 1, i)
    fig.update_layout(height=360)
    return f"<p>{note}</p>" + fig.to_html(full_html=False, include_plotlyjs=False)


def resource_profile_html(samples: list[dict]) -> str:
    """Like the seeds' GPU profile card: utilisation and memory per GPU, else CPU and RAM."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not samples:
        return "<p>no samples</p>"
    df = pd.DataFrame(samples)
    util = [c for c in df if c.endswith("_util_percent")] or ["cpu_percent"]
    mem = [c for c in df if c.endswith("_mem_used_gb")] or ["ram_used_gb"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("utilisation %", "memory used (GiB)"))
    for c in util:
        fig.add_trace(go.Scatter(x=df["t_s"], y=df[c], name=c), row=1, col=1)
    for c in mem:
        fig.add_trace(go.Scatter(x=df["t_s"], y=df[c], name=c), row=1, col=2)
    fig.update_xaxes(title_text="seconds")
    fig.update_layout(height=340)
    peak = ", ".join(f"{c} max {df[c].max():.2f}" for c in [*util, *mem])
    return f"<p>{len(df)} samples on the rank-0 node: {peak}.</p>" + fig.to_html(full_html=False, include_plotlyjs=False)


def samples_table_html(rows: list[dict]) -> str:
    if not rows:
        return "<p>no evaluations (no held-out data, or train.eval_steps is 0)</p>"
    df = pd.DataFrame(rows)
    df["eval_loss"] = df["eval_loss"].map(lambda x: f"{x:.4f}")
    return table_html(df[["step", "eval_loss", "prompt_id", "generation", "reference", "prompt"]], max_rows=400)


def train_result(outputs, tracked_run_id: str) -> TrainResult:
    """Rank 0's task outputs from the core's TrainOutputs (every method)."""
    s = outputs.summary
    return TrainResult(
        model=FlyteDirectory(str(outputs.model_dir)),
        adapter=FlyteDirectory(str(outputs.adapter_dir)) if outputs.adapter_dir else None,
        steps=s.steps,
        first_loss=s.first_loss,
        final_loss=s.final_loss,
        trained_tokens=s.trained_tokens,
        tokens_per_s=s.tokens_per_s,
        runtime_s=s.runtime_s,
        world_size=s.world_size,
        best_step=s.best_step,
        best_eval_loss=s.best_eval_loss,
        resumed_from_step=s.resumed_from_step,
        metrics=FlyteFile(str(outputs.model_dir.parent / "train_summary.json")),
        tracked_run_id=tracked_run_id,
    )


@contextlib.contextmanager
def rank0_tracking(tracking: TrackedRun):
    """The TrackingCallback that streams this attempt's curves (it opens the run on rank 0 only).

    On failure the run is closed as failed, and a retry resumes the same run.
    """
    tracker = TrackingCallback(tracking, wandb_api_key() if tracking.backend == "wandb" else "")
    try:
        yield tracker
    except BaseException:
        if tracker.tracker is not None:
            tracker.tracker.close("failed")
        raise


def suspend_tracking(tracker: TrackingCallback, outputs) -> str:
    """Rank 0 after training: attach train_summary.json and hand the run to finish_tracking; its id or ""."""
    if tracker.tracker is None:
        return ""
    tracker.tracker.log_artifact(outputs.model_dir.parent / "train_summary.json", tracker.run.stage or "train")
    tracker.tracker.close("suspended")  # finish_tracking ends the run
    return tracker.run.run_id

"""train: an Elastic (torchrun) task whose scale and resources come from the run config.

``train_model`` is a dynamic workflow that reads ``TrainConfig`` and launches a copy of
``train_elastic`` built for its nodes and processes (``configure_elastic``, see
tasks/elastic.py for why not ``with_overrides(task_config=...)``), with CPU, memory, GPUs,
accelerator type, retries and interruptible set by ``with_overrides``. With ``nnodes=1``
the task runs as one pod; with ``nnodes>1`` it is a Kubeflow PyTorchJob.

A local ``pyflyte run`` executes nodes directly and ignores ``with_overrides``, so there
the dynamic runs a copy of the task configured the same way: the local run honours
``train.nproc_per_node`` too.

Checkpoints go to Flyte's intra-task checkpoint (tasks/checkpoint.py); a retry, whether
from a spot preemption (``interruptible``) or ``retries``, resumes from the last one. The
Elastic launcher runs with ``max_restarts=0`` and the core bounds every collective by
``train.collective_timeout_s``, so a dead rank fails the attempt instead of hanging it; a rank
killed by a signal and a rendezvous failure are retried as well (tasks/elastic.py).
"""

from __future__ import annotations

import contextlib
import copy
import typing
from typing import Optional

import pandas as pd
from flytekit import Cache, Resources, dynamic, task
from flytekit.extras.accelerators import GPUAccelerator
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from flytekit.types.structured import StructuredDataset
from flytekitplugins.kfpytorch import Elastic
from flytekitplugins.kfpytorch.task import PytorchElasticFunctionTask

from images.specs import cpu_image, gpu_image
from llm_finetune.config import DataConfig, TrainConfig, TrainOps, deepspeed_config_path, is_interruptible, join_train
from llm_finetune.data.lengths import BatchPlan
from llm_finetune.disk import disk_gib, training_copies
from llm_finetune.errors import ConfigError
from llm_finetune.tracking import TrackedRun, TrackingCallback, tracking_html
from llm_finetune.train import train as run_training
from tasks.checkpoint import FlyteCheckpointStore
from tasks.elastic import configure_elastic, recoverable_elastic
from tasks.common import CACHE_TRAIN, DEEPSPEED_DIR, WANDB_SECRET, is_local, publish_deck, recoverable, table_html, wandb_api_key
from tasks.model_files import directory_bytes
from tasks.node_inputs import node_local_directory, node_local_frame


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
    return f"{disk_gib(base_model_bytes, training_copies(cfg.method, cfg.dpo.weights))}Gi"


def _curves(log_history: list[dict]) -> str:
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


def _resource_profile(samples: list[dict]) -> str:
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


def _samples_table(rows: list[dict]) -> str:
    if not rows:
        return "<p>no evaluations (no held-out data, or train.eval_steps is 0)</p>"
    df = pd.DataFrame(rows)
    df["eval_loss"] = df["eval_loss"].map(lambda x: f"{x:.4f}")
    return table_html(df[["step", "eval_loss", "prompt_id", "generation", "reference", "prompt"]], max_rows=400)


def train_result(outputs, tracked_run_id: str) -> TrainResult:
    """Rank 0's task outputs from the core's TrainOutputs (train_elastic and dpo_elastic alike)."""
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


@task(
    task_config=elastic_config(TrainConfig()),
    container_image=gpu_image,
    cache=CACHE_TRAIN_IGNORING_OPS,
    requests=resources(TrainConfig()),
    retries=2,
    interruptible=is_interruptible(TrainConfig()),  # train_model sets it per config (CPU: no; GPUs: spot)
    shared_memory=True,
    enable_deck=True,
    secret_requests=[WANDB_SECRET],
)
def train_elastic(
    base_model: FlyteDirectory,
    train_data: StructuredDataset,
    eval_data: StructuredDataset,
    data: DataConfig,
    train: TrainConfig,
    train_ops: TrainOps,
    tracking: Optional[TrackedRun] = None,  # not in the cache key
) -> TrainResult:
    """Runs on every worker process; global rank 0's return value is the task's output.

    Transient faults (a lost peer rank, a collective timeout, a store that did not answer)
    leave as FlyteRecoverableException, so Flyte retries the task and the next attempt
    resumes from the last checkpoint; anything else fails the run with its own message.
    """
    train = join_train(train, train_ops)
    ds_path = deepspeed_config_path(train.deepspeed, DEEPSPEED_DIR)
    tracking = tracking or TrackedRun()
    with rank0_tracking(tracking) as tracker, recoverable():
        frame, heldout = node_local_frame(train_data), node_local_frame(eval_data)  # one download per node
        outputs = run_training(
            node_local_directory(base_model), frame, data, train, None, deepspeed_config=ds_path, eval_frame=heldout,
            checkpoint_store=FlyteCheckpointStore.current(), callbacks=(tracker,),
        )
    if outputs is None:  # not rank 0: Flyte ignores this value
        return None  # type: ignore[return-value]
    tracked_run_id = suspend_tracking(tracker, outputs)
    s = outputs.summary
    logs = pd.DataFrame(s.log_history)
    best = f"best validation loss {s.best_eval_loss:.4f} at step {s.best_step} (returned)" if s.best_step >= 0 else "last step returned"
    resumed = f" Resumed from step {s.resumed_from_step}." if s.resumed_from_step else ""
    publish_deck(
        "train",
        {
            "Training curves": _curves(s.log_history),
            "Resource profile": _resource_profile(s.resource_profile),
            "Sample generations": _samples_table(s.samples),
            "Run": f"<p>{s.method} on {s.world_size} process(es): {s.steps} steps, loss {s.first_loss:.4f} -> "
            f"{s.final_loss:.4f}; {best}; {s.trained_tokens} trained tokens at {s.tokens_per_s:.1f} tokens/s."
            f"{resumed}</p>" + table_html(logs, max_rows=200),
            "Tracking": tracking_html(tracking),
        },
    )
    return train_result(outputs, tracked_run_id)


# a rank killed by a signal, or the launcher's rendezvous failing, is retried too (tasks/elastic.py)
train_elastic = recoverable_elastic(train_elastic)


def _configured_copy(cfg: TrainConfig, base: PytorchElasticFunctionTask | None = None) -> PytorchElasticFunctionTask:
    """A copy of ``train_elastic`` (or ``base``) with the config's Elastic settings, for local runs."""
    if cfg.nnodes > 1:
        raise ConfigError(
            [f"train.nnodes: {cfg.nnodes} nodes need a cluster; run with pyflyte run --remote, or set nnodes: 1 locally"]
        )
    local = recoverable_elastic(copy.copy(base or train_elastic))
    local._task_config = elastic_config(cfg)
    local.min_nodes = local.max_nodes = 1
    return local


@dynamic(container_image=cpu_image, cache=CACHE_TRAIN_IGNORING_OPS)
def train_model(
    base_model: FlyteDirectory,
    train_data: StructuredDataset,
    eval_data: StructuredDataset,
    data: DataConfig,
    train: TrainConfig,
    train_ops: TrainOps,
    tracking: Optional[TrackedRun] = None,  # the execution's MLflow / W&B run; not in the cache key
    batch: Optional[BatchPlan] = None,  # get_data's fitted micro-batch / accumulation / checkpointing
) -> TrainResult:
    """Launch the Elastic training task at the scale and on the hardware the config asks for."""
    # the rows' length decided the micro-batch (an unset input can arrive as a promise while compiling: no truth test)
    plan = batch if isinstance(batch, BatchPlan) else BatchPlan()
    train, train_ops = plan.apply(train, train_ops)
    full = join_train(train, train_ops)
    # configure_elastic, not with_overrides(task_config=...): see tasks/elastic.py
    base = preference_train.dpo_elastic if train.method == "dpo" else train_elastic  # DPO: tasks/preference_train.py
    task_fn = _configured_copy(full, base) if is_local() else configure_elastic(base, elastic_config(full))
    result = task_fn(
        base_model=base_model, train_data=train_data, eval_data=eval_data, data=data, train=train, train_ops=train_ops,
        tracking=tracking,  # a promise on a cluster: passed on as it is
    )
    # the disk from the base model's size, listed in the store (no download); locally the overrides are ignored
    res = resources(full, None if is_local() else training_disk(full, directory_bytes(base_model)))
    return result.with_overrides(
        requests=res,
        limits=res,
        accelerator=GPUAccelerator(full.accelerator) if full.accelerator else None,
        retries=full.retries,
        # spot nodes for GPU training (auto), never for CPU training: the runbook's spot pools are GPU pools.
        # Propeller runs the last attempt on-demand (interruptible-failure-threshold, deploy/flyte-binary-values.yaml).
        interruptible=is_interruptible(full),
        container_image=training_image(full).image_name(),  # the override takes an image URI
    )


def training_image(cfg: TrainConfig):
    """The CUDA image (several GB, with DeepSpeed) only where it is used: GPUs or DeepSpeed; else the CPU image."""
    return gpu_image if cfg.gpus_per_node > 0 or deepspeed_config_path(cfg.deepspeed, DEEPSPEED_DIR) else cpu_image


# At the end on purpose: tasks/preference_train.py builds on this module's TrainResult and deck helpers.
import tasks.preference_train as preference_train  # noqa: E402

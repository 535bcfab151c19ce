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

import copy
from dataclasses import asdict
from typing import Optional

import pandas as pd
from flytekit import dynamic, task
from flytekit.extras.accelerators import GPUAccelerator
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from flytekit.types.structured import StructuredDataset
from flytekitplugins.kfpytorch.task import PytorchElasticFunctionTask

from images.specs import cpu_image, gpu_image
from llm_finetune import sweep as sweeps
from llm_finetune.config import (
    DataConfig, TrainConfig, TrainOps, deepspeed_config_path, is_interruptible, join_train, sweep_trials,
)
from llm_finetune.data.lengths import BatchPlan
from llm_finetune.errors import ConfigError
from llm_finetune.methods import method_spec
from llm_finetune.sweep import SweepConfig
from llm_finetune.tracking import TrackedRun, config_params, start_child_run, tracking_html
from llm_finetune.training.harness import train as run_training
from tasks.checkpoint import FlyteCheckpointStore
from tasks.elastic import configure_elastic, recoverable_elastic
from tasks.common import DEEPSPEED_DIR, WANDB_SECRET, is_local, publish_deck, recoverable, table_html, wandb_api_key
from tasks.tracking import execution_name
from tasks.sweep import TrainedModel, choose_trial, lanes
from tasks.model_files import directory_bytes
from tasks.node_inputs import node_local_directory, node_local_frame
from tasks.train_parts import (  # noqa: F401 - re-exported: tests and bench import them from here
    CACHE_TRAIN_IGNORING_OPS, TrainResult, curves_html, elastic_config, method_curves_html, rank0_tracking,
    resource_profile_html, resources, samples_table_html, suspend_tracking, train_result, training_disk,
)


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
    sweep_trial: bool = False,  # a sweep trial: a non-finite loss ends it as diverged instead of failing the sweep
) -> TrainResult:
    """Runs on every worker process, for every method (the harness picks the recipe from ``train.method``);
    global rank 0's return value is the task's output.

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
    s, spec = outputs.summary, method_spec(train.method)
    best = f"best validation loss {s.best_eval_loss:.4f} at step {s.best_step} (returned)" if s.best_step >= 0 else "last step returned"
    resumed = f" Resumed from step {s.resumed_from_step}." if s.resumed_from_step else ""
    last = next((h for h in reversed(s.log_history) if any(f"eval_{k}" in h for k in spec.deck_metrics)), {})
    validation = "; ".join(f"{k} {last[f'eval_{k}']:.3f}" for k in spec.deck_metrics if f"eval_{k}" in last)
    panels = {"Training curves": curves_html(s.log_history)}
    if spec.deck_metrics:
        panels[f"{spec.name.upper()} metrics"] = method_curves_html(s.log_history, spec.deck_metrics, spec.deck_note)
    publish_deck(
        "train",
        {
            **panels,
            "Resource profile": resource_profile_html(s.resource_profile),
            "Sample generations": samples_table_html(s.samples),
            "Run": f"<p>{s.method} on {s.world_size} process(es): {s.steps} steps, loss {s.first_loss:.4f} -> "
            f"{s.final_loss:.4f}; {best}; {s.trained_tokens} trained tokens at {s.tokens_per_s:.1f} tokens/s."
            + (f" Last validation: {validation}." if validation else "")
            + f"{resumed}</p>" + table_html(pd.DataFrame(s.log_history), max_rows=200),
            "Tracking": tracking_html(tracking),
        },
    )
    return train_result(outputs, tracked_run_id)


# a rank killed by a signal, or the launcher's rendezvous failing, is retried too (tasks/elastic.py)
train_elastic = recoverable_elastic(train_elastic)


def diverged_trial(kwargs: dict, message: str) -> TrainResult | None:
    """A sweep trial whose training loss turned non-finite (every rank stopped; tasks/elastic.py): a result whose
    validation loss is NaN, so the trial is listed as diverged and never chosen. None (fail as usual) otherwise."""
    if not kwargs.get("sweep_trial"):
        return None
    import json
    import math
    import re
    import tempfile
    from pathlib import Path

    step = re.search(r"at step (\d+)", message)
    steps = int(step.group(1)) if step else 0
    train = kwargs["train"]
    print(f"[train] sweep trial diverged, listed as such and not chosen: {message}", flush=True)
    summary = Path(tempfile.mkdtemp(prefix="diverged-")) / "train_summary.json"
    summary.write_text(json.dumps({"diverged": message.splitlines()[0], "steps": steps, "log_history": []}))
    nan = math.nan
    return TrainResult(model=kwargs["base_model"], adapter=None, steps=steps, first_loss=nan, final_loss=nan,
                       trained_tokens=0, tokens_per_s=0.0, runtime_s=0.0, world_size=train.nnodes * train.nproc_per_node,
                       best_step=-1, best_eval_loss=nan, resumed_from_step=0, metrics=FlyteFile(str(summary)),
                       tracked_run_id="")


train_elastic.on_divergence = diverged_trial


def _configured_copy(cfg: TrainConfig) -> PytorchElasticFunctionTask:
    """A copy of ``train_elastic`` with the config's Elastic settings, for local runs."""
    if cfg.nnodes > 1:
        raise ConfigError(
            [f"train.nnodes: {cfg.nnodes} nodes need a cluster; run with pyflyte run --remote, or set nnodes: 1 locally"]
        )
    local = recoverable_elastic(copy.copy(train_elastic))
    local._task_config = elastic_config(cfg)
    local.min_nodes = local.max_nodes = 1
    return local


@dynamic(container_image=cpu_image, cache=CACHE_TRAIN_IGNORING_OPS, secret_requests=[WANDB_SECRET])
def train_model(
    base_model: FlyteDirectory,
    train_data: StructuredDataset,
    eval_data: StructuredDataset,
    data: DataConfig,
    train: TrainConfig,
    train_ops: TrainOps,
    tracking: Optional[TrackedRun] = None,  # the execution's MLflow / W&B run; not in the cache key
    batch: Optional[BatchPlan] = None,  # get_data's fitted micro-batch / accumulation / checkpointing
    sweep: Optional[SweepConfig] = None,  # several trials, the best by validation loss returned (tasks/sweep.py)
) -> TrainedModel:
    """Launch the Elastic training task at the scale and on the hardware the config asks for: once, or
    once per sweep trial (each its own cached node) followed by ``choose_trial``."""
    # the rows' length decided the micro-batch (an unset input can arrive as a promise while compiling: no truth test)
    plan = batch if isinstance(batch, BatchPlan) else BatchPlan()
    train, train_ops = plan.apply(train, train_ops)
    run = tracking if isinstance(tracking, TrackedRun) else None
    if not (isinstance(sweep, SweepConfig) and sweep.enabled):
        result = _launch(base_model, train_data, eval_data, data, train, train_ops, tracking)
        return (*(getattr(result, f) for f in TrainResult._fields), None)
    trials = sweep_trials(sweep)
    # a local run executes the dynamic's nodes in call order, one at a time; the lanes bound a cluster run
    at_once = "one after another locally" if is_local() else f"at most {sweep.concurrency} at once"
    print(f"[sweep] {len(trials)} trials, {at_once}:", flush=True)
    results, runs = [], []
    for i, settings in enumerate(trials):
        print(f"[sweep]   trial {i}: {sweeps.label(settings)}", flush=True)
        trial_train = sweeps.apply(train, settings)
        child = start_child_run(run, f"{execution_name()}-trial{i}", config_params({"train": asdict(trial_train)}),
                                {"sweep.trial": str(i), **{k: str(v) for k, v in settings.items()}},
                                wandb_api_key()) if run is not None else TrackedRun()
        runs.append(child)
        results.append(_launch(base_model, train_data, eval_data, data, trial_train, train_ops, child, name=f"trial-{i}",
                               sweep_trial=True))
    for earlier, later in lanes(len(results), sweep.concurrency):  # at most sweep.concurrency trials at once
        results[earlier].model >> results[later].model
    columns = {f: [getattr(r, f) for r in results] for f in TrainResult._fields}
    return choose_trial(settings=[sweeps.encoded(t) for t in trials], **columns, trial_runs=runs,
                        concurrency=sweep.concurrency, parameters=sweep.parameters)


def _launch(base_model, train_data, eval_data, data: DataConfig, train: TrainConfig, train_ops: TrainOps, tracking,
            name: str = "", sweep_trial: bool = False):
    """One ``train_elastic`` node configured for ``train`` (inside ``train_model``): its outputs' promise."""
    full = join_train(train, train_ops)
    # configure_elastic, not with_overrides(task_config=...): see tasks/elastic.py
    task_fn = _configured_copy(full) if is_local() else configure_elastic(train_elastic, elastic_config(full))
    result = task_fn(
        base_model=base_model, train_data=train_data, eval_data=eval_data, data=data, train=train, train_ops=train_ops,
        tracking=tracking,  # a promise on a cluster: passed on as it is
        sweep_trial=sweep_trial,
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
        **({"name": name} if name else {}),
    )


def training_image(cfg: TrainConfig):
    """The CUDA image (several GB, with DeepSpeed) only where it is used: GPUs or DeepSpeed; else the CPU image."""
    return gpu_image if cfg.gpus_per_node > 0 or deepspeed_config_path(cfg.deepspeed, DEEPSPEED_DIR) else cpu_image



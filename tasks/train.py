"""train: an Elastic (torchrun) task whose scale and resources come from the run config.

``train_model`` is a dynamic workflow that reads ``TrainConfig`` and launches a copy of
``train_elastic`` built for its nodes and processes (``configure_elastic``, see
tasks/elastic.py for why not ``with_overrides(task_config=...)``), with CPU, memory, GPUs,
accelerator type, retries and interruptible set by ``with_overrides``. With ``nnodes=1``
the task runs as one pod; with ``nnodes>1`` it is a Kubeflow PyTorchJob.

A local ``pyflyte run`` executes nodes directly and ignores ``with_overrides``, so there
the dynamic runs a copy of the task configured the same way: the local run honours
``train.nproc_per_node`` too.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from typing import Optional

import pandas as pd
from flytekit import Resources, dynamic, task
from flytekit.extras.accelerators import GPUAccelerator
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset
from flytekitplugins.kfpytorch import Elastic
from flytekitplugins.kfpytorch.task import PytorchElasticFunctionTask

from images.specs import cpu_image, gpu_image
from llm_finetune.config import DataConfig, TrainConfig, deepspeed_config_path
from llm_finetune.errors import ConfigError
from llm_finetune.train import train as run_training
from tasks.elastic import configure_elastic
from tasks.common import CACHE_TRAIN, DEEPSPEED_DIR, is_local, publish_deck, table_html


@dataclass
class TrainResult:
    model: FlyteDirectory  # merged (LoRA) or fully fine-tuned model
    adapter: Optional[FlyteDirectory]  # LoRA adapter; None for full fine-tuning
    steps: int
    first_loss: float
    final_loss: float
    trained_tokens: int
    tokens_per_s: float
    runtime_s: float
    world_size: int


def elastic_config(cfg: TrainConfig) -> Elastic:
    return Elastic(
        nnodes=cfg.nnodes,
        nproc_per_node=cfg.nproc_per_node,
        max_restarts=0,  # Flyte retries the whole task (and resumes from its checkpoint) instead
        rdzv_configs={"timeout": 900, "join_timeout": 900},
        increase_shared_mem=False,  # deprecated; shared memory is requested on the task
    )


def resources(cfg: TrainConfig) -> Resources:
    return Resources(cpu=cfg.cpu, mem=cfg.memory, gpu=cfg.gpus_per_node or None)


def _curves(log_history: list[dict]) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    logs = pd.DataFrame([h for h in log_history if "loss" in h])
    if logs.empty:
        return "<p>no training logs</p>"
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "learning rate"))
    fig.add_trace(go.Scatter(x=logs["step"], y=logs["loss"], name="train loss"), row=1, col=1)
    fig.add_trace(go.Scatter(x=logs["step"], y=logs["learning_rate"], name="lr"), row=1, col=2)
    fig.update_layout(height=340, showlegend=False)
    return fig.to_html(full_html=False, include_plotlyjs=True)


@task(
    task_config=elastic_config(TrainConfig()),
    container_image=gpu_image,
    cache=CACHE_TRAIN,
    requests=resources(TrainConfig()),
    retries=2,
    interruptible=True,
    shared_memory=True,
    enable_deck=True,
)
def train_elastic(
    base_model: FlyteDirectory, train_data: StructuredDataset, data: DataConfig, train: TrainConfig
) -> TrainResult:
    """Runs on every worker process; global rank 0's return value is the task's output."""
    ds_path = deepspeed_config_path(train.deepspeed, DEEPSPEED_DIR)
    frame = train_data.open(pd.DataFrame).all()
    out = tempfile.mkdtemp(prefix="train-")
    outputs = run_training(base_model.download(), frame, data, train, out, deepspeed_config=ds_path)
    if outputs is None:  # not rank 0: Flyte ignores this value
        return None  # type: ignore[return-value]
    s = outputs.summary
    logs = pd.DataFrame(s.log_history)
    publish_deck(
        "train",
        {
            "Training curves": _curves(s.log_history),
            "Run": f"<p>{s.method} on {s.world_size} process(es): {s.steps} steps, loss {s.first_loss:.4f} -> "
            f"{s.final_loss:.4f}, {s.trained_tokens} trained tokens at {s.tokens_per_s:.1f} tokens/s.</p>"
            + table_html(logs, max_rows=200),
        },
    )
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
    )


def _configured_copy(cfg: TrainConfig) -> PytorchElasticFunctionTask:
    """A copy of ``train_elastic`` with the config's Elastic settings, for local runs."""
    if cfg.nnodes > 1:
        raise ConfigError(
            [f"train.nnodes: {cfg.nnodes} nodes need a cluster; run with pyflyte run --remote, or set nnodes: 1 locally"]
        )
    local = copy.copy(train_elastic)
    local._task_config = elastic_config(cfg)
    local.min_nodes = local.max_nodes = 1
    return local


@dynamic(container_image=cpu_image, cache=CACHE_TRAIN)
def train_model(base_model: FlyteDirectory, train_data: StructuredDataset, data: DataConfig, train: TrainConfig) -> TrainResult:
    """Launch the Elastic training task at the scale and on the hardware the config asks for."""
    # configure_elastic, not with_overrides(task_config=...): see tasks/elastic.py
    task_fn = _configured_copy(train) if is_local() else configure_elastic(train_elastic, elastic_config(train))
    result = task_fn(base_model=base_model, train_data=train_data, data=data, train=train)
    return result.with_overrides(
        requests=resources(train),
        limits=resources(train),
        accelerator=GPUAccelerator(train.accelerator) if train.accelerator else None,
        retries=train.retries,
        interruptible=train.interruptible,
    )

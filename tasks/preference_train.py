"""dpo_elastic: the Elastic (torchrun) task for preference tuning (``train.method: dpo``).

The twin of ``train_elastic`` (tasks/train.py): the same Elastic launch, resources, cache,
retries, intra-task checkpoint and ``TrainResult``, so ``train_model`` launches either one at
the config's scale and everything downstream (assess, quantize, publish) is unchanged. Its
deck adds TRL's reward curves: margins, chosen and rejected rewards, reward accuracy (train
and validation).
"""

from __future__ import annotations

from typing import Optional

import pandas as pd
from flytekit import task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

from images.specs import gpu_image
from llm_finetune.config import DataConfig, TrainConfig, TrainOps, deepspeed_config_path, is_interruptible, join_train
from llm_finetune.preference import REWARD_METRICS, train_dpo
from llm_finetune.tracking import TrackedRun, tracking_html
from tasks.checkpoint import FlyteCheckpointStore
from tasks.elastic import recoverable_elastic
from tasks.common import DEEPSPEED_DIR, WANDB_SECRET, publish_deck, recoverable, table_html
from tasks.node_inputs import node_local_directory, node_local_frame
from tasks.train_parts import (
    CACHE_TRAIN_IGNORING_OPS, TrainResult, curves_html, elastic_config, rank0_tracking, resource_profile_html, resources,
    samples_table_html, suspend_tracking, train_result,
)


def rewardcurves_html(log_history: list[dict]) -> str:
    """One panel per reward metric, train (logged every train.logging_steps) and validation."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    logs = pd.DataFrame([h for h in log_history if "loss" in h])
    evals = pd.DataFrame([h for h in log_history if "eval_loss" in h])
    if logs.empty:
        return "<p>no training logs</p>"
    fig = make_subplots(rows=1, cols=len(REWARD_METRICS), subplot_titles=REWARD_METRICS)
    for i, key in enumerate(REWARD_METRICS, start=1):
        if key in logs:
            fig.add_trace(go.Scatter(x=logs["step"], y=logs[key], name=f"train {key}"), row=1, col=i)
        if f"eval_{key}" in evals:
            fig.add_trace(go.Scatter(x=evals["step"], y=evals[f"eval_{key}"], name=f"validation {key}", mode="lines+markers"), 1, i)
    fig.update_layout(height=360)
    note = ("<p>rewards = beta x (policy - reference) log-probability of an answer; accuracy = share of pairs whose chosen "
            "reward beats the rejected one; margin = chosen - rejected reward. Rising margins and accuracy mean the policy "
            "is learning the preferences.</p>")
    return note + fig.to_html(full_html=False, include_plotlyjs=False)


@task(
    task_config=elastic_config(TrainConfig()),
    container_image=gpu_image,
    cache=CACHE_TRAIN_IGNORING_OPS,
    requests=resources(TrainConfig()),
    retries=2,
    interruptible=is_interruptible(TrainConfig()),  # train_model sets it per config, as for train_elastic
    shared_memory=True,
    enable_deck=True,
    secret_requests=[WANDB_SECRET],
)
def dpo_elastic(
    base_model: FlyteDirectory,
    train_data: StructuredDataset,
    eval_data: StructuredDataset,
    data: DataConfig,
    train: TrainConfig,
    train_ops: TrainOps,
    tracking: Optional[TrackedRun] = None,  # not in the cache key
) -> TrainResult:
    """Runs on every worker process; global rank 0's return value is the task's output (as train_elastic)."""
    train = join_train(train, train_ops)
    ds_path = deepspeed_config_path(train.deepspeed, DEEPSPEED_DIR)
    tracking = tracking or TrackedRun()
    with rank0_tracking(tracking) as tracker, recoverable():
        outputs = train_dpo(
            node_local_directory(base_model), node_local_frame(train_data), data, train, None, deepspeed_config=ds_path,
            eval_frame=node_local_frame(eval_data), checkpoint_store=FlyteCheckpointStore.current(), callbacks=(tracker,),
        )
    if outputs is None:  # not rank 0: Flyte ignores this value
        return None  # type: ignore[return-value]
    tracked_run_id = suspend_tracking(tracker, outputs)
    s = outputs.summary
    last = next((h for h in reversed(s.log_history) if "eval_rewards/accuracies" in h), {})
    best = f"best validation loss {s.best_eval_loss:.4f} at step {s.best_step} (returned)" if s.best_step >= 0 else "last step returned"
    resumed = f" Resumed from step {s.resumed_from_step}." if s.resumed_from_step else ""
    validation = (f" Last validation: reward accuracy {last['eval_rewards/accuracies']:.1%}, margin "
                  f"{last.get('eval_rewards/margins', float('nan')):.3f}." if last else "")
    publish_deck(
        "train",
        {
            "Training curves": curves_html(s.log_history),
            "Reward curves": rewardcurves_html(s.log_history),
            "Resource profile": resource_profile_html(s.resource_profile),
            "Sample generations": samples_table_html(s.samples),
            "Run": f"<p>{s.method} on {s.world_size} process(es): {s.steps} steps, DPO loss {s.first_loss:.4f} -> "
            f"{s.final_loss:.4f}; {best}; {s.trained_tokens} tokens at {s.tokens_per_s:.1f} tokens/s.{validation}"
            f"{resumed}</p>" + table_html(pd.DataFrame(s.log_history), max_rows=200),
            "Tracking": tracking_html(tracking),
        },
    )
    return train_result(outputs, tracked_run_id)


# a rank killed by a signal, or the launcher's rendezvous failing, is retried too (tasks/elastic.py)
dpo_elastic = recoverable_elastic(dpo_elastic)

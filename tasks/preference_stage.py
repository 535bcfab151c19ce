"""preference_stage: SFT then preference tuning (DPO, KTO or ORPO) in one execution (the ``preference`` section).

A dynamic workflow after the first training stage. With ``preference.enabled`` it prepares
the preference pairs with the first stage's tokenizer and launches ``train_model`` (hence
``train_elastic`` with the stage's ``train.method``) with the first stage's output model as the base; otherwise it hands the
first stage's outputs through untouched. Its tasks are cached on their own inputs: the
stage-1 model directory (the same URI when stage 1 is served from the cache), the stage's
data and train sections. So re-running with a new ``preference.train.dpo.beta`` re-trains
only the DPO stage, and a new first-stage setting re-trains both.
"""

import typing
from typing import Optional

from flytekit import dynamic
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from flytekit.types.structured import StructuredDataset

from images.specs import cpu_image
from llm_finetune.config import DataConfig, TrainConfig, TrainOps
from llm_finetune.tracking import TrackedRun
from tasks.data import get_data
from tasks.train import train_model

StageOutputs = typing.NamedTuple(
    "StageOutputs",
    [
        ("model", FlyteDirectory),
        ("adapter", Optional[FlyteDirectory]),
        ("heldout", StructuredDataset),
        ("metrics", Optional[FlyteFile]),  # the DPO stage's train_summary.json; None when disabled
        ("tracked_run_id", str),  # the run the DPO stage streamed to ("" when disabled, untracked or cached)
        ("sft_model", Optional[FlyteDirectory]),  # the first stage's model the DPO stage trained on; None when disabled
    ],
)


@dynamic(container_image=cpu_image)
def preference_stage(
    enabled: bool,
    model: FlyteDirectory,
    adapter: Optional[FlyteDirectory],
    heldout: StructuredDataset,
    preference_data: DataConfig,
    preference_train: TrainConfig,
    preference_train_ops: TrainOps,
    tracking: Optional[TrackedRun] = None,  # the execution's MLflow / W&B run
    first_stage_steps: int = 0,
) -> StageOutputs:
    """The final model, its adapter, and the test split assess scores it on (the pairs' test split, after DPO).

    The DPO curves stream to the execution's run as ``dpo/train/...`` and ``dpo/eval/...``, at steps
    after the first stage's ``first_stage_steps``.
    """
    if not enabled:
        return model, adapter, heldout, None, "", None
    print(f"[preference_stage] {preference_train.method} ({preference_train.weights}) on "
          f"{preference_data.source}, starting from the first stage's model", flush=True)
    splits = get_data(data=preference_data, base_model=model, train=preference_train, train_ops=preference_train_ops)
    trained = train_model(  # validation pairs choose the checkpoint; test pairs only score
        base_model=model, train_data=splits.train_tokens, eval_data=splits.validation, data=preference_data,
        train=preference_train, train_ops=preference_train_ops,
        tracking=tracking.for_stage("dpo", first_stage_steps) if tracking and tracking.run_id else None,
        batch=splits.batch,
    )
    # the DPO adapter is relative to ``model`` (the merged SFT model): push_to_hub publishes it as its base
    return trained.model, trained.adapter, splits.test, trained.metrics, trained.tracked_run_id, model

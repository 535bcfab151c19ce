"""Event-driven retraining: wait for new data to land, then launch the fine-tune.

    pyflyte run --remote workflows/data_refresh.py data_refresh \
        --data_uri s3://my-bucket/llm-finetune/data/2026-11-22.jsonl --config configs/retrain_nightly.yaml

``wait_for_data`` is a ``FileSensor``: on a cluster it is executed by the Flyte
connector (agent) service, which polls the URI without holding a pod. When the file
exists, ``point_config_at`` sets ``data.source`` to it and the fine-tune starts as its
own execution (a launch-plan node, not a sub-workflow): the producer of the data and
the training run stay decoupled, and the fine-tune keeps its own caching and history.
"""

import dataclasses
from datetime import timedelta

from flytekit import LaunchPlan, task, workflow
from flytekit.sensor.file_sensor import FileSensor

from images.specs import cpu_image
from llm_finetune.config import FineTuneConfig
from tasks.result import FineTuneResult
from workflows.fine_tune import fine_tune

# Give up after a day; the scheduled launch plans are the fallback.
wait_for_data = FileSensor(name="wait_for_data", timeout=timedelta(hours=24))

fine_tune_lp = LaunchPlan.get_or_create(workflow=fine_tune)  # the default launch plan


@task(container_image=cpu_image)
def point_config_at(config: FineTuneConfig, data_uri: str) -> FineTuneConfig:
    """The run's config with ``data.source`` replaced by the URI that just arrived."""
    return dataclasses.replace(config, data=dataclasses.replace(config.data, source=data_uri))


@workflow
def data_refresh(data_uri: str, config: FineTuneConfig = FineTuneConfig()) -> FineTuneResult:
    arrived = wait_for_data(path=data_uri)
    cfg = point_config_at(config=config, data_uri=data_uri)
    arrived >> cfg
    return fine_tune_lp(config=cfg)

"""First stage: reject a bad config before any model download or GPU time."""

from flytekit import task

from images.specs import cpu_image
from llm_finetune.config import FineTuneConfig, validate
from llm_finetune.errors import ConfigError
from llm_finetune.tracking import tracking_problems
from tasks.common import DEEPSPEED_DIR, WANDB_SECRET, is_local, wandb_api_key


@task(container_image=cpu_image, secret_requests=[WANDB_SECRET])
def validate_config(config: FineTuneConfig) -> FineTuneConfig:
    """Return the config unchanged when valid; raise ConfigError listing every problem otherwise."""
    validate(config, deepspeed_dir=DEEPSPEED_DIR)
    # tracking needs the task's environment: the W&B secret, and whether this runs in a pod
    key = wandb_api_key() if config.tracking.backend == "wandb" else ""
    problems = tracking_problems(config.tracking, key, remote=not is_local())
    if problems:
        raise ConfigError(problems)
    return config

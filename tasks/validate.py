"""First stage: reject a bad config before any model download or GPU time."""

from flytekit import task

from images.specs import cpu_image
from llm_finetune.config import FineTuneConfig, validate
from tasks.common import DEEPSPEED_DIR, is_local, start_local_run


@task(container_image=cpu_image)
def validate_config(config: FineTuneConfig) -> FineTuneConfig:
    """Return the config unchanged when valid; raise ConfigError listing every problem otherwise."""
    if is_local():
        start_local_run()  # a new runs/<execution id>/ for this execution's decks and summary
    return validate(config, deepspeed_dir=DEEPSPEED_DIR)

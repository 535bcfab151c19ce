"""prepare_base_model: the base model once, as a cached safetensors HF directory."""

import tempfile

from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory

from images.specs import cpu_image
from llm_finetune.config import ModelConfig
from llm_finetune.model import materialize
from tasks.common import CACHE_MODEL, HF_TOKEN_ENV_SECRET, MODEL_DISK, recoverable


@task(
    container_image=cpu_image,
    cache=CACHE_MODEL,
    retries=3,  # hub downloads fail transiently
    secret_requests=[HF_TOKEN_ENV_SECRET],
    # the download's disk: fits the smallest CPU node, see MODEL_DISK (was 50Gi, more than a GKE default node offers)
    requests=Resources(cpu="2", mem="8Gi", ephemeral_storage=MODEL_DISK),
)
@recoverable()
def prepare_base_model(model: ModelConfig) -> FlyteDirectory:
    """Materialise ``model.base_model`` (embedded GGUF, local dir or hub id) as an HF directory."""
    out = tempfile.mkdtemp(prefix="base-model-")
    materialize(model.base_model, out, revision=model.revision)
    return FlyteDirectory(out)

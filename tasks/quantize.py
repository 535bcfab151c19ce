"""quantize: bitsandbytes int8 / nf4 copy of the tuned model."""

import tempfile
from typing import Optional

from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory

from images.specs import cpu_image
from llm_finetune.config import QuantizeConfig
from llm_finetune.quantize import quantize
from tasks.common import CACHE_QUANTIZE


@task(container_image=cpu_image, cache=CACHE_QUANTIZE, retries=1, requests=Resources(cpu="2", mem="8Gi"))
def quantize_model(model: FlyteDirectory, quantize_cfg: QuantizeConfig) -> Optional[FlyteDirectory]:
    """None when ``quantize.bits`` is 0."""
    if quantize_cfg.bits == 0:
        print("[quantize] quantize.bits is 0: skipped")
        return None
    out = tempfile.mkdtemp(prefix=f"quantized-{quantize_cfg.bits}bit-")
    quantize(model.download(), out, quantize_cfg.bits)
    return FlyteDirectory(out)

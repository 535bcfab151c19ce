"""quantize: bitsandbytes int8 / nf4 and GGUF copies of the tuned model, checked before training starts."""

import tempfile
from dataclasses import dataclass

from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory

from images.specs import cpu_image
from llm_finetune.evaluation.benchmarks import check_available
from llm_finetune.config import EvalConfig, QuantizeConfig, quantize_variants
from llm_finetune.export.gguf_convert import check_exportable
from llm_finetune.export.quantize import GGUF_VARIANTS, quantize_variant
from tasks.common import CACHE_QUANTIZE, recoverable
from tasks.model_files import model_metadata


@dataclass
class QuantizedModel:
    variant: str  # int8 | nf4 | gguf_q8_0 | gguf_f16 | gguf_q4_k_m | gguf_q5_k_m
    model: FlyteDirectory  # from_pretrained directory (bnb) or the folder holding the .gguf file
    gguf_file: str  # the .gguf file name inside model; empty for bitsandbytes variants
    size_mb: float


@task(container_image=cpu_image, cache=CACHE_QUANTIZE, requests=Resources(cpu="1", mem="2Gi"))
def check_outputs(base_model: FlyteDirectory, evaluate: EvalConfig, quantize: QuantizeConfig) -> bool:
    """Before any training: GGUF variants need an architecture the exporter supports; benchmarks need lm_eval.

    The tuned model keeps the base model's architecture and tokenizer, so checking the base
    model here spares a failed export after hours of GPU time.
    """
    check_available(evaluate)
    if any(v in GGUF_VARIANTS for v in quantize_variants(quantize)):
        check_exportable(model_metadata(base_model)[0])  # config and tokenizer files only, not the weights
    return True


# defaults for the embedded model; assess sizes it from the config (one GPU when training had GPUs)
@task(container_image=cpu_image, cache=CACHE_QUANTIZE, retries=1, requests=Resources(cpu="2", mem="8Gi"))
@recoverable()
def quantize_model(model: FlyteDirectory, quantize_cfg: QuantizeConfig, name: str) -> list[QuantizedModel]:
    """One entry per ``quantize.variants`` item (empty list: skipped). ``name`` names GGUF files."""
    variants = quantize_variants(quantize_cfg)
    if not variants:
        print("[quantize] quantize.variants is empty: skipped")
        return []
    src = model.download()
    out = []
    for v in variants:
        q = quantize_variant(src, tempfile.mkdtemp(prefix=f"quantized-{v}-"), v, name=name)
        print(f"[quantize] {v}: {q.path} ({q.size_mb:.1f} MB)", flush=True)
        out.append(QuantizedModel(variant=v, model=FlyteDirectory(str(q.path)), gguf_file=q.gguf_file, size_mb=q.size_mb))
    return out


@task(container_image=cpu_image, cache=CACHE_QUANTIZE, requests=Resources(cpu="1", mem="1Gi"))
def model_size_mb(model: FlyteDirectory) -> float:
    """The tuned model's weights in MB, weighed from the store's listing (no download, no disk)."""
    from tasks.model_files import weights_mb_listed

    return weights_mb_listed(model)

"""assess: evaluate base and tuned, quantize, evaluate the variants, each on hardware sized from the config.

A dynamic workflow so the resources can follow ``train.gpus_per_node`` (read at run time):
evaluation and quantization take one GPU (and the CUDA image) when training used GPUs, and
the CPU image with no GPU otherwise; never the training job's 8 GPUs.
Locally the overrides are ignored and tasks run in-process.
"""

import typing

from flytekit import dynamic
from flytekit.extras.accelerators import GPUAccelerator
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

from images.specs import cpu_image, gpu_image
from llm_finetune.config import FineTuneConfig
from tasks.evaluate import EvalReport, VariantMetrics, eval_resources, evaluate_model, evaluate_quantized
from tasks.quantize import QuantizedModel, model_size_mb, quantize_model

Assessment = typing.NamedTuple(
    "Assessment",
    [("base", EvalReport), ("tuned", EvalReport), ("quantized", list[QuantizedModel]), ("variants", list[VariantMetrics]), ("tuned_mb", float)],
)


def gguf_stem(config: FineTuneConfig) -> str:
    """File name stem for GGUF exports: the base model's name. Never a publishing setting (hub.*): the
    quantize task's cache key holds it, and renaming the hub repo must not re-run quantization."""
    return config.model.base_model.rstrip("/").split("/")[-1] or "model"


@dynamic(container_image=cpu_image)
def assess(base_model: FlyteDirectory, tuned_model: FlyteDirectory, eval_data: StructuredDataset, config: FineTuneConfig) -> Assessment:
    res = eval_resources(config.train)
    over = dict(
        requests=res,
        limits=res,
        accelerator=GPUAccelerator(config.train.accelerator) if config.train.accelerator and res.gpu else None,
        container_image=(gpu_image if res.gpu else cpu_image).image_name(),  # the override takes an image URI
    )
    base = evaluate_model(model=base_model, eval_data=eval_data, data=config.data, evaluate=config.evaluate, label="base").with_overrides(**over)
    tuned = evaluate_model(model=tuned_model, eval_data=eval_data, data=config.data, evaluate=config.evaluate, label="tuned").with_overrides(**over)
    quantized = quantize_model(model=tuned_model, quantize_cfg=config.quantize, name=gguf_stem(config)).with_overrides(**over)
    size = model_size_mb(model=tuned_model)
    variants = []
    if config.quantize.evaluate:
        variants = evaluate_quantized(
            quantized=quantized, eval_data=eval_data, data=config.data, evaluate=config.evaluate, tuned=tuned, tuned_mb=size
        ).with_overrides(**over)
    return base, tuned, quantized, variants, size

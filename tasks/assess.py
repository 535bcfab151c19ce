"""assess: evaluate base and tuned, quantize, evaluate the variants, each on hardware sized from the config.

A dynamic workflow so the resources can follow ``train.gpus_per_node`` (read at run time):
evaluation and quantization take one GPU (and the CUDA image) when training used GPUs, and
the CPU image with no GPU otherwise; never the training job's 8 GPUs. Each pod's disk
(ephemeral storage) is sized from the models it reads, listed in the store without a download
(llm_finetune/disk.py). Locally the overrides are ignored and tasks run in-process.
"""

import typing

from flytekit import Resources, dynamic
from flytekit.extras.accelerators import GPUAccelerator
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

from images.specs import cpu_image, gpu_image
from llm_finetune.config import FineTuneConfig
from llm_finetune.config import quantize_variants
from llm_finetune.disk import EVAL_COPIES, EVAL_QUANTIZED_COPIES, disk_gib, quantize_copies
from tasks.common import is_local
from tasks.evaluate import EvalReport, VariantMetrics, eval_resources, evaluate_model, evaluate_quantized
from tasks.model_files import directory_bytes
from tasks.quantize import QuantizedModel, model_size_mb, quantize_model

Assessment = typing.NamedTuple(
    "Assessment",
    [("base", EvalReport), ("tuned", EvalReport), ("quantized", list[QuantizedModel]), ("variants", list[VariantMetrics]), ("tuned_mb", float)],
)


def gguf_stem(config: FineTuneConfig) -> str:
    """File name stem for GGUF exports: the base model's name. Never a publishing setting (hub.*): the
    quantize task's cache key holds it, and renaming the hub repo must not re-run quantization."""
    return config.model.base_model.rstrip("/").split("/")[-1] or "model"


def node_overrides(config: FineTuneConfig, r: Resources, model_bytes: int | None, copies: float) -> dict:
    """Node overrides: the evaluation hardware ``r``, and a disk request for ``copies`` copies of the model (unset if unknown)."""
    disk = f"{disk_gib(model_bytes, copies)}Gi" if model_bytes is not None else None
    sized = Resources(cpu=r.cpu, mem=r.mem, gpu=r.gpu, ephemeral_storage=disk)
    return dict(
        requests=sized,
        limits=sized,
        accelerator=GPUAccelerator(config.train.accelerator) if config.train.accelerator and r.gpu else None,
        container_image=(gpu_image if r.gpu else cpu_image).image_name(),  # the override takes an image URI
    )


# the labels of sft_task_scores' three reports, in order
SFT_TASK_MODELS = ("base", "SFT", "SFT+DPO")


@dynamic(container_image=cpu_image)
def sft_task_scores(enabled: bool, base_model: FlyteDirectory, sft_model: FlyteDirectory, final_model: FlyteDirectory,
                    eval_data: StructuredDataset, config: FineTuneConfig) -> list[EvalReport]:
    """After SFT -> DPO, the task the user trained for: its test split scored for base, SFT and SFT+DPO.

    ``assess`` scores the final model on the preference pairs only, so a DPO stage that hurts the
    supervised task would go unseen; these three reports are summarized beside it (SFT_TASK_MODELS
    order). Empty, with no node, when there is no DPO stage. The base's report is the same cached
    node a run without the DPO stage computes.
    """
    if not enabled:
        return []
    res = eval_resources(config.train)
    out = []
    for model, label in zip((base_model, sft_model, final_model), ("base", "sft", "sft_dpo")):
        size = None if is_local() else directory_bytes(model)
        out.append(evaluate_model(model=model, eval_data=eval_data, data=config.data, evaluate=config.evaluate,
                                  label=label).with_overrides(**node_overrides(config, res, size, EVAL_COPIES)))
    return out


@dynamic(container_image=cpu_image)
def assess(base_model: FlyteDirectory, tuned_model: FlyteDirectory, eval_data: StructuredDataset, config: FineTuneConfig) -> Assessment:
    res = eval_resources(config.train)
    base_bytes, tuned_bytes = (None, None) if is_local() else (directory_bytes(base_model), directory_bytes(tuned_model))

    def over(model_bytes, copies: int, r: Resources = res) -> dict:
        return node_overrides(config, r, model_bytes, copies)

    base = evaluate_model(model=base_model, eval_data=eval_data, data=config.data, evaluate=config.evaluate, label="base").with_overrides(
        **over(base_bytes, EVAL_COPIES))
    tuned = evaluate_model(model=tuned_model, eval_data=eval_data, data=config.data, evaluate=config.evaluate, label="tuned").with_overrides(
        **over(tuned_bytes, EVAL_COPIES))
    quantized = quantize_model(model=tuned_model, quantize_cfg=config.quantize, name=gguf_stem(config)).with_overrides(
        **over(tuned_bytes, quantize_copies(quantize_variants(config.quantize))))
    # weighs the tuned model from the store's listing: a small CPU pod with no disk
    size = model_size_mb(model=tuned_model)
    variants = []
    if config.quantize.evaluate:
        variants = evaluate_quantized(
            quantized=quantized, eval_data=eval_data, data=config.data, evaluate=config.evaluate, tuned=tuned, tuned_mb=size
        ).with_overrides(**over(tuned_bytes, EVAL_QUANTIZED_COPIES))
    return base, tuned, quantized, variants, size

"""Which precision and attention kernel a run trains with, decided from the hardware it sees."""

from __future__ import annotations

import torch

from llm_finetune.config import TrainConfig
from llm_finetune.errors import ConfigError
from llm_finetune.training.distributed import local_rank

# Ampere (8.0) and newer: native bf16, and the Triton kernels flex attention compiles to. Older cards
# (T4 7.5, V100 7.0) report bf16 as supported through emulation (slow) and cannot run flex attention.
NATIVE_BF16_CAPABILITY = (8, 0)


def gpu_capability() -> tuple[int, int] | None:
    """This process's GPU compute capability (major, minor); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(local_rank()))


def attention_implementation(packed: bool) -> str:
    """Flex attention skips the masked blocks of packed rows on Ampere and newer GPUs; SDPA elsewhere.

    Never flex on CPU: it has no backward there, and torch's compiled CPU forward is wrong on AVX2 CPUs
    for key lengths of 8 mod 16 (packing.CPU_FLEX_LENGTH_MULTIPLE; bench/NOTES.md). Nor on GPUs older
    than compute capability 8.0, where its kernels do not run: there packed rows go through SDPA with
    the mask transformers builds from the restarted position ids (packing.py).
    """
    cap = gpu_capability()
    if packed and cap is not None and cap >= NATIVE_BF16_CAPABILITY:
        return "flex_attention"
    return "sdpa"


def use_bf16(cfg: TrainConfig) -> bool:
    """bf16 mixed precision: asked for, or ``auto`` on a GPU with native bf16 (not ``is_bf16_supported``,
    which is also true where bf16 is only emulated)."""
    if cfg.precision == "bf16":
        return True
    if cfg.precision == "auto":
        cap = gpu_capability()
        return cap is not None and cap >= NATIVE_BF16_CAPABILITY
    return False


def use_fp16(cfg: TrainConfig) -> bool:
    """fp16 mixed precision with loss scaling: asked for, or ``auto`` on a GPU without native bf16 (T4, V100)."""
    if cfg.precision == "fp16":
        return True
    if cfg.precision == "auto":
        cap = gpu_capability()
        return cap is not None and cap < NATIVE_BF16_CAPABILITY
    return False


def check_hardware(cfg: TrainConfig) -> None:
    """Refuse, before any weight is loaded, what this process's hardware cannot train."""
    if cfg.weights == "qlora" and not torch.cuda.is_available():
        raise ConfigError(["train.weights: qlora needs a CUDA GPU, and this process sees none; use lora on CPU"])
    if cfg.precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise ConfigError([f"train.precision: {cfg.precision} needs a CUDA GPU, and this process sees none"])
    cap = gpu_capability()
    if cfg.precision == "bf16" and cap is not None and cap < NATIVE_BF16_CAPABILITY:
        name = torch.cuda.get_device_name(local_rank())
        raise ConfigError([f"train.precision: bf16 on {name} (compute capability {cap[0]}.{cap[1]}) is emulated: slower "
                           f"than fp32 and no memory saved; use auto (fp16 with loss scaling on this GPU) or fp16"])

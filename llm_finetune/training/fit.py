"""Will the model fit? A lower-bound memory estimate checked before any weight is loaded.

Counts only what training must hold per process (weights, gradients, Adam states), not
activations, so a refusal is certain rather than a guess: if even this does not fit, the
run would die with an out-of-memory error after the download and the GPU wait.
"""

from __future__ import annotations

import json
from pathlib import Path

from llm_finetune.errors import ConfigError

GiB = 2**30


def count_parameters(model_dir: Path) -> int:
    """Parameter count from the safetensors headers (no weights are read)."""
    from llm_finetune.model_files import parameters_in, safetensors_header

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            total += parameters_in(safetensors_header(fh))
    return total


def training_bytes(n_params: int, weights: str, bf16: bool, zero_stage: int, world_size: int, offload: bool) -> float:
    """Bytes per process for weights + gradients + optimizer states (ZeRO shards them over ranks).

    ``zero_stage`` 3 is also FSDP2 (``train.sharding: fsdp2``), which shards all three over every process.
    """
    if weights == "qlora":
        return n_params * 0.55  # nf4 weights with double-quantised scales; adapters are tiny
    if weights == "lora":  # frozen base (sharded like every weight under stage 3); adapter states are negligible
        return n_params * (2 if bf16 else 4) / (max(world_size, 1) if zero_stage >= 3 else 1)
    weights, grads, optim = (2.0 if bf16 else 4.0), (2.0 if bf16 else 4.0), 12.0 if bf16 else 8.0  # Adam m, v (+fp32 master)
    n = max(world_size, 1)
    if zero_stage >= 1:
        optim = 0.0 if offload else optim / n
    if zero_stage >= 2:
        grads /= n
    if zero_stage >= 3:
        weights = 0.0 if offload else weights / n
    return n_params * (weights + grads + optim)


def check_fits(n_params: int, weights: str, bf16: bool, zero_stage: int, world_size: int, offload: bool,
               available_bytes: float, device: str) -> None:
    need = training_bytes(n_params, weights, bf16, zero_stage, world_size, offload)
    if need <= available_bytes:
        return
    hint = {
        "full": "use train.weights: lora or qlora, train.deepspeed: zero3 (or zero3_offload) or train.sharding: fsdp2, "
                "or more GPUs",
        "lora": "use train.weights: qlora (4-bit base) or a GPU with more memory",
        "qlora": "use a GPU with more memory",
    }[weights]
    raise ConfigError([
        f"train.weights: {weights} of a {n_params / 1e9:.2f}B-parameter model needs at least {need / GiB:.1f} GiB per "
        f"process for weights, gradients and optimizer states, but {device} has {available_bytes / GiB:.1f} GiB; {hint}"
    ])


def deepspeed_offload(deepspeed_config: str | Path | None) -> bool:
    if not deepspeed_config:
        return False
    zero = json.loads(Path(deepspeed_config).read_text()).get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device") == "cpu"

"""``data.max_length: auto``: the example length fitted to the data, the model and the hardware.

The chosen length is the smallest that keeps at least 99% of the rows (``COVERAGE``),
rounded up to a multiple of 8, then capped by

- the model's context (``max_position_embeddings`` and similar keys of config.json), and
- what one training process can hold: device memory (the GPU of ``train.accelerator``, or
  ``train.memory`` shared by ``train.nproc_per_node`` CPU processes) minus weights,
  gradients and optimizer states (fit.py) and a fixed overhead, divided by the activation
  memory of one micro-batch (``per_device_batch_size`` rows of the length).

Activation bytes per token (``activation_bytes_per_token``): per layer the inputs the
backward pass keeps (about 10 x hidden + 4 x intermediate values), the fp32 logits with
their softmax and gradient (3 x vocab x 4 bytes), and on CPU, where SDPA materialises the
attention probabilities, 1.5 x heads x length values per layer. Measured on this 2-core
CPU for the embedded SmolLM2-135M with LoRA in fp32 (peak RSS over the loaded model): 2.56
MB/token at 2 x 512 tokens and 3.62 MB/token at 1 x 1024; the formula gives 2.85 and 3.68.
The estimate is printed and shown in the get_data deck with the length it led to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llm_finetune.config import TrainConfig
from llm_finetune.fit import GiB, training_bytes

COVERAGE = 0.99
ROUND_TO = 8
OVERHEAD_BYTES = 1 * GiB  # framework, CUDA context / Python heap, allocator slack
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
GPU_GIB = {  # memory of one GPU of a train.accelerator value (longest matching key wins)
    "h200": 141, "h100": 80, "a100-80gb": 80, "a100": 40, "l40s": 48, "l40": 48, "a10g": 24, "a10": 24,
    "l4": 24, "v100": 16, "t4": 16, "a6000": 48, "rtx-4090": 24,
}
DEFAULT_GPU_GIB = 24  # train.accelerator empty or unknown: assume a 24 GiB GPU and say so


@dataclass
class LengthChoice:
    max_length: int
    auto: bool  # False: data.max_length was set explicitly
    coverage_length: int  # smallest length (multiple of 8) keeping >= 99% of rows
    context_limit: int  # 0 = unknown
    memory_limit: int  # 0 = not estimated
    limited_by: str  # "data", "model context", "memory", or "data.max_length"
    device: str  # what the memory estimate assumed
    bytes_per_token: float
    activation_gib: float  # estimated activation memory of one micro-batch at max_length
    batch_size: int = 1  # train.per_device_batch_size the estimate assumed

    def describe(self) -> str:
        how = "auto" if self.auto else "set by data.max_length"
        caps = [f"99% of rows fit in {self.coverage_length}"]
        if self.context_limit:
            caps.append(f"model context {self.context_limit}")
        if self.memory_limit:
            caps.append(f"memory allows {self.memory_limit} on {self.device}")
        text = f"max_length {self.max_length} ({how}; limited by {self.limited_by}; {', '.join(caps)})"
        if self.bytes_per_token:
            text += (f"; costs about {self.activation_gib:.2f} GiB of activations per micro-batch "
                     f"({self.bytes_per_token / 1e6:.2f} MB per token)")
        return text


def coverage_length(lengths, coverage: float = COVERAGE) -> int:
    """Smallest multiple of ``ROUND_TO`` that at least ``coverage`` of ``lengths`` fit in."""
    x = np.sort(np.asarray(list(lengths), dtype=np.int64))
    if len(x) == 0:
        return ROUND_TO
    need = x[math.ceil(coverage * len(x)) - 1]  # the k-th smallest, k = ceil(coverage * n)
    return int(math.ceil(need / ROUND_TO) * ROUND_TO)


def model_context(model_config: dict) -> int:
    for key in CONTEXT_KEYS:
        value = model_config.get(key) or (model_config.get("text_config") or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def _quantity_bytes(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    q = str(q).strip()
    for u in sorted(units, key=len, reverse=True):
        if q.endswith(u):
            return float(q[: -len(u)]) * units[u]
    return float(q)


def device_memory(train: TrainConfig) -> tuple[float, str]:
    """Bytes one training process may use, and a description of the assumption."""
    if train.gpus_per_node > 0:
        acc = train.accelerator.lower()
        match = max((k for k in GPU_GIB if k in acc), key=len, default=None)
        if match is None:
            return DEFAULT_GPU_GIB * GiB, f"an assumed {DEFAULT_GPU_GIB} GiB GPU (train.accelerator {train.accelerator or 'empty'})"
        return GPU_GIB[match] * GiB, f"{train.accelerator} ({GPU_GIB[match]} GiB)"
    total = _quantity_bytes(train.memory)
    n = max(train.nproc_per_node, 1)
    return total / n, f"CPU, train.memory {train.memory} shared by {n} process(es)"


def bf16_training(train: TrainConfig) -> bool:
    return train.gpus_per_node > 0 and train.precision in ("auto", "bf16")


def activation_bytes_per_token(model_config: dict, train: TrainConfig, length: int) -> float:
    cfg = {**(model_config.get("text_config") or {}), **model_config}
    h = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 4096
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * h
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or 32
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 32
    vocab = cfg.get("vocab_size") or 32000
    width = 2 if bf16_training(train) or train.method == "qlora" else 4
    per_layer = (10 * h + 4 * inter) * width
    if train.gradient_checkpointing:  # keep each layer's input, recompute one layer at a time
        layer_bytes = layers * h * width + per_layer
    else:
        layer_bytes = layers * per_layer
    kept_layers = 1 if train.gradient_checkpointing else layers
    attention = 0.0 if train.gpus_per_node > 0 else 1.5 * kept_layers * heads * length * 4  # CPU SDPA keeps probabilities
    return layer_bytes + attention + 3 * vocab * 4


def memory_limit(model_config: dict, n_params: int, train: TrainConfig, zero_stage: int = 0, offload: bool = False) -> tuple[int, str]:
    """Longest row such that ``per_device_batch_size`` rows fit beside the training states (0: no room at all)."""
    available, device = device_memory(train)
    world = max(train.nnodes * train.nproc_per_node, 1)
    static = training_bytes(n_params, train.method, bf16_training(train), zero_stage, world, offload)
    room = 0.9 * (available - static - OVERHEAD_BYTES)
    if room <= 0:
        return 0, device
    batch = max(train.per_device_batch_size, 1)
    lo, hi = 0, 1 << 20  # the per-token cost grows with the length on CPU: bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if batch * mid * activation_bytes_per_token(model_config, train, mid) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo // ROUND_TO * ROUND_TO, device


def choose_max_length(
    lengths, requested: int, model_config: dict, n_params: int, train: TrainConfig, zero_stage: int = 0, offload: bool = False
) -> LengthChoice:
    """The length to train at: ``requested`` when set (> 0), else fitted (see the module docstring)."""
    cover = coverage_length(lengths)
    context = model_context(model_config)
    mem, device = memory_limit(model_config, n_params, train, zero_stage, offload) if n_params else (0, "unknown")
    if requested > 0:
        length, by = requested, "data.max_length"
    else:
        candidates = [(cover, "data")]
        if context:
            candidates.append((context, "model context"))
        if mem:
            candidates.append((mem, "memory"))
        length, by = min(candidates, key=lambda c: c[0])
        length = max(length, 16)
    per_token = activation_bytes_per_token(model_config, train, length) if model_config else 0.0
    return LengthChoice(
        max_length=int(length), auto=requested <= 0, coverage_length=cover, context_limit=context, memory_limit=mem,
        limited_by=by, device=device, bytes_per_token=per_token,
        activation_gib=max(train.per_device_batch_size, 1) * length * per_token / GiB,
        batch_size=max(train.per_device_batch_size, 1),
    )

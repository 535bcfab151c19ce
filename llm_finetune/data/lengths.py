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
With activation checkpointing each layer keeps only its input and one layer is recomputed at a
time; on CPU a quarter of each layer's activations is counted as well, for what glibc's heap still
holds after the recomputations freed them (``CPU_RECOMPUTE_RETAINED``).
The estimate is printed and shown in the get_data deck with the length it led to.

Preference methods: the optimizer states are those of ``train.weights`` (LoRA holds a frozen
base, not full fine-tuning's states; full DPO and KTO add a frozen reference copy, ORPO has
none), and a pair runs its chosen and rejected answers through the backward pass, so a
micro-batch of pairs costs twice the activations of as many SFT rows (``Method.sequences_per_row``). When the states alone leave no
room for one row, get_data fails with the fix instead of ignoring the estimate.

**Fit the batch, keep the rows.** The micro-batch is a throughput choice; the rows are the
user's data. With ``train.per_device_batch_size: auto`` (the default) the length that keeps
99% of the rows is fitted first and the micro-batch second: 4 rows if they fit, else 2, then
1 (gradient accumulation raised by the same factor, so the tokens per optimizer step stay
the same), then 1 row with activation checkpointing; only when even that cannot hold the
length is it capped by memory and rows dropped, with the reason. The plan (``BatchPlan``)
is printed, shown in the get_data deck and the run summary, and applied by the train task.
A batch size set in the config is kept: when its rows cannot hold the length, get_data
fails with the plan that would fit instead of dropping rows.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field

import numpy as np

from llm_finetune.config import AUTO_MICRO_BATCH, TrainConfig, micro_batch
from llm_finetune.errors import DataError
from llm_finetune.methods import method_spec
from llm_finetune.training.fit import GiB, training_bytes

COVERAGE = 0.99
ROUND_TO = 8
OVERHEAD_BYTES = 1 * GiB  # framework, CUDA context / Python heap, allocator slack
# Checkpointed training on CPU: glibc serves the recomputed layers' tensors from its heap and cannot
# reuse the holes for the next layer's, so the RSS of a checkpointed step grows with the layer count,
# not only by the kept layer inputs (with a fixed mmap threshold the step's RSS fell to a quarter, but
# the step took 1.5x as long, so the estimate counts the heap instead). Measured (bench/NOTES.md, fp32
# LoRA, 1 row): 15 layers more added 0.46-0.59 of their ``per_layer`` bytes each, while the logits term
# over-counts the labelled-positions loss, which holds one chunk of logits at a time. 0.25 of ``per_layer``
# per layer is the smallest multiple of 0.05 that covers the 1,800-token step on both CPUs: 1,713 MiB here,
# and about 1,965 MiB on the CI machine whose 3.05 GiB peak broke the previous estimate of 1,380 MiB (that
# peak less this machine's 1,158 MiB before the step); on the 15-layer shape it is 1.6x the measurement.
# A GPU's caching allocator reuses the blocks: no such term there.
CPU_RECOMPUTE_RETAINED = 0.25
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
GPU_GIB = {  # memory of one GPU of a train.accelerator value (longest matching key wins)
    "h200": 141, "h100": 80, "a100-80gb": 80, "a100": 40, "l40s": 48, "l40": 48, "a10g": 24, "a10": 24,
    "l4": 24, "v100": 16, "t4": 16, "a6000": 48, "rtx-4090": 24,
}
DEFAULT_GPU_GIB = 24  # train.accelerator empty or unknown: assume a 24 GiB GPU and say so


@dataclass
class BatchPlan:
    """Rows per micro-batch, gradient accumulation and activation checkpointing for the fitted length.

    get_data's output, applied by the train task (``apply``). ``micro_batch`` 0: no plan, the
    config's values are used as they are.
    """

    micro_batch: int = 0
    gradient_accumulation_steps: int = 0
    gradient_checkpointing: bool = False
    note: str = ""  # what changed and why, e.g. "micro-batch 4 -> 1, gradient accumulation 1 -> 4, ..."

    def apply(self, train, ops=None):
        """``train`` (and ``ops``, the operational half holding gradient_checkpointing) with this plan."""
        if self.micro_batch <= 0:
            return train if ops is None else (train, ops)
        train = dataclasses.replace(train, per_device_batch_size=self.micro_batch,
                                    gradient_accumulation_steps=self.gradient_accumulation_steps)
        if ops is None:
            return dataclasses.replace(train, gradient_checkpointing=self.gradient_checkpointing)
        return train, dataclasses.replace(ops, gradient_checkpointing=self.gradient_checkpointing)


def _plan(train: TrainConfig, rows: int, checkpointing: bool, why: str) -> BatchPlan:
    """The plan training ``rows`` per micro-batch with the configured tokens per optimizer step."""
    nominal, accumulation = micro_batch(train), train.gradient_accumulation_steps
    steps = max(accumulation * nominal // rows, 1)
    changes = []
    if rows != nominal:
        changes.append(f"micro-batch {nominal} -> {rows}, gradient accumulation {accumulation} -> {steps}, "
                       "tokens per optimizer step unchanged")
    if checkpointing and not train.gradient_checkpointing:
        changes.append("activation checkpointing on")
    note = f"{'; '.join(changes)} ({why})" if changes else ""
    return BatchPlan(rows, steps, checkpointing, note)


def batch_options(train: TrainConfig) -> list[tuple[int, bool]]:
    """(rows per micro-batch, activation checkpointing) to try, cheapest change first."""
    if train.per_device_batch_size > 0:
        return [(train.per_device_batch_size, train.gradient_checkpointing)]
    rows = [b for b in (AUTO_MICRO_BATCH, 2, 1) if b <= AUTO_MICRO_BATCH]
    options = [(b, train.gradient_checkpointing) for b in dict.fromkeys(rows)] + [(1, True)]
    return list(dict.fromkeys(options))


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
    batch_size: int = 1  # rows per micro-batch the estimate assumed (the plan's, when fitted)
    plan: BatchPlan = field(default_factory=BatchPlan)

    def describe(self) -> str:
        how = "auto" if self.auto else "set by data.max_length"
        caps = [f"99% of rows fit in {self.coverage_length}"]
        if self.context_limit:
            caps.append(f"model context {self.context_limit}")
        if self.memory_limit:
            caps.append(f"memory allows {self.memory_limit} on {self.device}")
        text = f"max_length {self.max_length} ({how}; limited by {self.limited_by}; {', '.join(caps)})"
        if self.bytes_per_token:
            text += (f"; costs about {self.activation_gib:.2f} GiB of activations per micro-batch of {self.batch_size} "
                     f"({self.bytes_per_token / 1e6:.2f} MB per token)")
        if self.plan.note:
            text += f"; batch fitted to keep the rows: {self.plan.note}"
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
    width = 2 if bf16_training(train) or train.weights == "qlora" else 4
    per_layer = (10 * h + 4 * inter) * width
    if train.gradient_checkpointing:  # keep each layer's input, recompute one layer at a time
        layer_bytes = layers * h * width + per_layer
        if train.gpus_per_node == 0:  # CPU: glibc's heap keeps part of what each recomputed layer freed
            layer_bytes += CPU_RECOMPUTE_RETAINED * layers * per_layer
    else:
        layer_bytes = layers * per_layer
    kept_layers = 1 if train.gradient_checkpointing else layers
    attention = 0.0 if train.gpus_per_node > 0 else 1.5 * kept_layers * heads * length * 4  # CPU SDPA keeps probabilities
    return layer_bytes + attention + 3 * vocab * 4


def static_bytes(n_params: int, train: TrainConfig, zero_stage: int = 0, offload: bool = False) -> float:
    """Weights, gradients and optimizer states of one process; a full-weight run of a method with a reference
    model (DPO, KTO: ``Method.reference_copy``) adds its frozen copy (LoRA's reference is the policy with its
    adapter disabled: no second copy)."""
    world = max(train.nnodes * train.nproc_per_node, 1)
    weights = train.weights
    need = training_bytes(n_params, weights, bf16_training(train), zero_stage, world, offload)
    if method_spec(train.method).reference_copy and weights == "full":
        need += n_params * (2 if bf16_training(train) else 4) / (world if zero_stage >= 3 else 1)
    return need


def rows_per_example(train: TrainConfig) -> int:
    """Sequences one example puts through the backward pass (``Method.sequences_per_row``): a pair runs
    chosen and rejected (a reference pass runs without gradients and keeps nothing), an SFT row runs once."""
    return method_spec(train.method).sequences_per_row


def memory_limit(model_config: dict, n_params: int, train: TrainConfig, zero_stage: int = 0, offload: bool = False) -> tuple[int, str]:
    """Longest row such that ``per_device_batch_size`` rows fit beside the training states (0: no room at all)."""
    available, device = device_memory(train)
    static = static_bytes(n_params, train, zero_stage, offload)
    room = 0.9 * (available - static - OVERHEAD_BYTES)
    if room <= 0:
        return 0, device
    batch = micro_batch(train) * rows_per_example(train)
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
    """The length to train at and the batch plan that holds it (see the module docstring).

    ``requested`` > 0 (``data.max_length`` set) is kept; else the length keeping 99% of the
    rows, capped by the model's context, then by memory only when no batch plan holds it.
    """
    cover = coverage_length(lengths)
    context = model_context(model_config)
    want = requested if requested > 0 else min(cover, context) if context else cover
    options = batch_options(train)
    chosen, (mem, device) = options[0], (0, "unknown")
    for rows, ckpt in options if n_params else []:
        chosen = (rows, ckpt)
        mem, device = memory_limit(model_config, n_params, dataclasses.replace(train, per_device_batch_size=rows,
                                                                           gradient_checkpointing=ckpt), zero_stage, offload)
        if mem >= want:
            break
    rows, ckpt = chosen
    if n_params and not mem:  # not even one row with activation checkpointing: the states alone fill the device
        available, device = device_memory(train)
        need = static_bytes(n_params, train, zero_stage, offload) + OVERHEAD_BYTES
        what = f"train.method {train.method} with train.weights {train.weights}"
        raise DataError(
            f"{what}: the model's weights, gradients and optimizer states ({need / GiB:.1f} GiB with overhead, for "
            f"{n_params / 1e9:.2f}B parameters) leave no room for a single row on {device}. Use LoRA or QLoRA "
            "(train.weights), a ZeRO config (train.deepspeed: zero3 or zero3_offload) "
            "over more GPUs, or a larger accelerator")
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
    if by == "memory" and train.per_device_batch_size > 0:
        raise DataError(_explicit_batch_problem(train, want, mem, device, lengths, model_config, n_params, zero_stage, offload))
    why = f"{micro_batch(train)} rows of {want} tokens do not fit on {device}" if (rows, ckpt) != options[0] else ""
    plan = _plan(train, rows, ckpt, why) if train.per_device_batch_size == 0 else BatchPlan()
    sized = dataclasses.replace(train, per_device_batch_size=rows, gradient_checkpointing=ckpt)
    per_token = activation_bytes_per_token(model_config, sized, length) * rows_per_example(train) if model_config else 0.0
    return LengthChoice(
        max_length=int(length), auto=requested <= 0, coverage_length=cover, context_limit=context, memory_limit=mem,
        limited_by=by, device=device, bytes_per_token=per_token, activation_gib=rows * length * per_token / GiB,
        batch_size=rows, plan=plan,
    )


def _explicit_batch_problem(train, want, mem, device, lengths, model_config, n_params, zero_stage, offload) -> str:
    """The error for a batch size set in the config whose rows cannot hold the length the data needs."""
    auto = choose_max_length(lengths, 0, model_config, n_params, dataclasses.replace(train, per_device_batch_size=0),
                             zero_stage, offload)
    fits = (f"micro-batch {auto.plan.micro_batch}, gradient accumulation {auto.plan.gradient_accumulation_steps}"
            + (", activation checkpointing" if auto.plan.gradient_checkpointing else "")
            if auto.limited_by != "memory" else "")
    return (
        f"train.per_device_batch_size: {train.per_device_batch_size} rows of {want} tokens (the length that keeps 99% of "
        f"the rows) do not fit on {device}; at that batch size memory allows {mem} tokens per row, so the longer rows "
        "would be dropped. Set train.per_device_batch_size: auto to keep the rows"
        + (f" (here: {fits}, the same tokens per optimizer step)" if fits else "")
        + ", or set train.gradient_checkpointing: true, raise train.memory or use a larger GPU, "
        "or set data.max_length to accept dropping the longer rows."
    )

"""How much local disk (Kubernetes ephemeral storage) a pod needs for a model of a given size.

On Flyte an ephemeral-storage request is also the pod's limit: propeller sets limit = request
when only a request is given (``AdjustOrDefaultResource`` in
``flyteplugins/go/tasks/pluginmachinery/flytek8s/container_helper.go``), and kubelet evicts a
pod that writes more than its limit. So a request must cover what the pod writes, and still
fit the node pool it lands on (deploy/node-pools.yaml; docs/deploy.md, "Node pools and disks"),
or the pod stays Pending until ``pod-pending-timeout`` fails it.

The estimates below are in copies of the model directory the pod reads (``model_bytes``, the
size of the files as stored), plus ``SLACK_GIB`` for the code bundle, data splits, tokenizer,
caches and logs. They err on the large side: an under-estimate gets the pod evicted mid-run.
"""

from __future__ import annotations

import math

GIB = 2**30
SLACK_GIB = 8

# The training pod: the base model, the output written next to it (a LoRA merge is saved in fp32
# when training ran in fp32, twice a bf16 base), and checkpoints. LoRA/QLoRA checkpoints are
# adapters (small next to the base). A full fine-tuning checkpoint holds fp32 master weights (2x a
# bf16 model), Adam's two fp32 moments (4x) and, under DeepSpeed, the 16-bit weights (1x): about 7
# model sizes; up to three are on disk at once (the latest and the best kept by save_total_limit,
# plus one staged for upload to Flyte's checkpoint store).
TRAIN_ADAPTER_COPIES = 3  # base + output up to 2x
TRAIN_FULL_COPIES = 2 + 3 * 7  # base + output + three checkpoints with optimizer state
# Evaluation reads one model; quantization reads the tuned model and writes every variant (int8
# 0.5x, nf4 0.25x, gguf_q8_0 0.53x, gguf_f16 1x: 2.3x at most); evaluate_quantized reads the variants.
EVAL_COPIES = 1
QUANTIZE_COPIES = 4
# each variant's size against the (16-bit) tuned model; llama.cpp's k-quants are made from a temporary
# f16 GGUF (1x more while the quantizer runs)
VARIANT_COPIES = {"int8": 0.5, "nf4": 0.25, "gguf_q8_0": 0.53, "gguf_f16": 1.0, "gguf_q4_k_m": 0.3, "gguf_q5_k_m": 0.36}
K_QUANTS = ("gguf_q4_k_m", "gguf_q5_k_m")


def quantize_copies(variants: list[str]) -> float:
    """Model copies on the quantize pod's disk: the input, every variant, the k-quants' temporary f16; at least 4."""
    need = 1 + sum(VARIANT_COPIES.get(v, 1.0) for v in variants) + (1.0 if set(variants) & set(K_QUANTS) else 0.0)
    return max(QUANTIZE_COPIES, need)
EVAL_QUANTIZED_COPIES = 3


def disk_gib(model_bytes: int, copies: float) -> int:
    """Whole GiB for ``copies`` copies of a ``model_bytes`` model plus the slack."""
    return math.ceil(copies * model_bytes / GIB) + SLACK_GIB


def training_copies(weights: str) -> int:
    """Model copies on a training pod's disk for ``train.weights`` (a reference model is the base already there)."""
    return TRAIN_FULL_COPIES if weights == "full" else TRAIN_ADAPTER_COPIES

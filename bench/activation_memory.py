"""Measured activation memory of one training step against the estimate that fits lengths and batches.

``llm_finetune/data/lengths.py: activation_bytes_per_token`` decides how long a row and how large a
micro-batch fit beside the training states. This measures what the pipeline's own step uses: the
embedded SmolLM2 loaded as training loads it (``training.weights.load_model``, LoRA, fp32 on CPU), the
labelled-positions loss with every position labelled (the worst case), one forward and backward,
in a fresh process per point (peak RSS growth after a short warm-up step), with and without
gradient checkpointing. CPU only: on a GPU the allocator and attention kernels differ.

    .venv/bin/python -m bench.activation_memory          # writes bench/results/activation_memory-cpu.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import gc, json, resource, sys
from pathlib import Path
import torch
from llm_finetune.config import TrainConfig
from llm_finetune.data.lengths import activation_bytes_per_token
from llm_finetune.training.label_loss import label_only_loss
from llm_finetune.training.weights import load_model
model_dir, length, ckpt = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
cfg = TrainConfig(gradient_checkpointing=ckpt)
model = load_model(model_dir, cfg, bf16=False)[0]
model.train()
if ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(0))
label_only_loss(model, {"input_ids": ids[:, :8], "labels": ids[:, :8]}).backward()  # lazily made buffers first
model.zero_grad(set_to_none=False)
gc.collect()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
label_only_loss(model, {"input_ids": ids, "labels": ids}).backward()
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
estimate = length * activation_bytes_per_token(json.loads((model_dir / "config.json").read_text()), cfg, length)
total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the whole process: framework, weights, activations
print(json.dumps({"measured_bytes": peak, "estimated_bytes": estimate, "peak_rss_bytes": total}))
"""


def measure(model_dir, length: int, gradient_checkpointing: bool) -> dict:
    """One fresh process: {measured_bytes (RSS growth of the step), estimated_bytes, peak_rss_bytes (whole process)}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", PROBE, str(model_dir), str(length), "1" if gradient_checkpointing else "0"],
                         capture_output=True, text=True, env=env, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def fewer_layers(model_dir, layers: int, out) -> Path:
    """The model's own configuration with ``layers`` decoder layers, built from the config (random weights)
    with its tokenizer: the same shape but depth, to see which part of the memory grows with the layers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def main() -> None:
    import tempfile

    from bench.common import embedded_model_dir, print_table, write_result

    model_dir = embedded_model_dir()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shapes = [("SmolLM2-135M (30 layers)", model_dir), ("same, 15 layers", fewer_layers(model_dir, 15, tmp))]
        for name, path in shapes:
            for length, ckpt in ((256, False), (1024, False), (256, True), (1024, True), (1800, True)):
                r = measure(path, length, ckpt)
                rows.append({"model": name, "length": length, "gradient_checkpointing": ckpt,
                             "measured_mib": round(r["measured_bytes"] / 2**20, 1),
                             "estimated_mib": round(r["estimated_bytes"] / 2**20, 1),
                             "estimate_over_measured": round(r["estimated_bytes"] / r["measured_bytes"], 2),
                             "peak_rss_mib": round(r["peak_rss_bytes"] / 2**20, 1)})
                print_table(rows[-1:], list(rows[-1]))
    path = write_result("activation_memory-cpu", {
        "what": "peak RSS growth of one forward+backward of the pipeline's LoRA step (labelled-positions loss, every "
                "position labelled, fp32, batch 1) vs activation_bytes_per_token x length; the 15-layer model is the "
                "embedded model's configuration with fewer layers, built from the config",
        "omp_threads": 1, "rows": rows})
    print_table(rows, list(rows[0]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

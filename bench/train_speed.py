"""Training speed: the naive path (HF Trainer, pad to longest, no packing) against ours.

    CPU (embedded 135M model, Alpaca-like data):  .venv/bin/python -m bench.train_speed
    GPU (~1.1B Llama from config, seq 2048, bf16): python -m bench.train_speed --device cuda
    GPU, 8B-class LoRA (Llama-3-8B shape):       python -m bench.train_speed --device cuda --model 8b \
                                                     --methods lora --gradient-checkpointing

Both rows use the HF Trainer on the same examples. Ours packs examples into
``max_length`` rows with a block-diagonal causal mask (no cross-example attention or
loss), uses flex attention on GPU (skips masked blocks), fused AdamW and torch.compile
on GPU. Each (method, path) runs in its own process so peak memory is its own.

Figures per row: trained tokens/s (labels that carry loss), real tokens/s (non-padding),
step time, peak memory, model FLOP/s and MFU. FLOPs per real token: full fine-tuning
6N (N = all parameters; attention's L^2 term left out, as in the usual 6N estimate);
LoRA 4N + 6N_lora (forward 2N and activation gradients 2N through the frozen weights,
weight gradients only for the adapters). MFU needs a peak figure: H100 SXM bf16 dense
989 TFLOP/s, H200 the same chip; on CPU no MFU is given, only GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, device_name, embedded_model_dir, print_table, write_result

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
GPU_MODELS = {  # Llama-architecture shapes, randomly initialised on the GPU: no download
    "1b": ("Llama ~1.1B (TinyLlama shape, random init)", dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)),
    "8b": ("Llama ~8B (Llama-3-8B shape, random init)", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)),
}
# per-model defaults on CUDA: the 8B-class LoRA row (issue 14: fits in 80 GB?) with activation checkpointing
GPU_DEFAULTS = {
    "1b": dict(steps=20, warmup=5, batch_size=16, max_length=2048, rows=4000),
    "8b": dict(steps=10, warmup=3, batch_size=8, max_length=2048, rows=2000),
}


# ---------------------------------------------------------------- data
def cpu_examples(n_rows: int, max_length: int) -> tuple[list[dict], str]:
    """Real tokenized Alpaca-like rows for the embedded model (prompt labels -100)."""
    from bench.alpaca_like import write_jsonl
    from llm_finetune.config import DataConfig
    from llm_finetune.data.prepare import prepare
    from llm_finetune.model import load_tokenizer

    model_dir = embedded_model_dir()
    tok = load_tokenizer(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_jsonl(Path(tmp) / "rows.jsonl", n_rows)
        p = prepare(DataConfig(source=str(src), max_length=max_length, truncation=True, eval_fraction=0.01), tok)
    rows = p.train_tokens.to_dict(orient="records")
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows], str(model_dir)


def synthetic_examples(n_rows: int, max_length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Token examples with Alpaca-like lengths (prompt ~40, completion ~110 tokens, long tail)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_rows):
        prompt = max(4, min(max_length // 4, int(rng.lognormvariate(0, 0.6) * 40)))
        completion = max(2, min(max_length - prompt, int(rng.lognormvariate(0, 0.9) * 110)))
        ids = [rng.randrange(3, vocab) for _ in range(prompt + completion)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


# ---------------------------------------------------------------- one measured run

def run_one(a: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainerCallback, TrainingArguments

    from llm_finetune.collate import TokenCollator
    from llm_finetune.packing import mask_first_label, pack_examples
    from llm_finetune.trainer import FineTuneTrainer

    cuda = a.device == "cuda"
    ours, trl = a.path == "ours", a.path == "trl_best"
    torch.manual_seed(0)
    if cuda:
        model_name, shape = GPU_MODELS[a.model]
        examples = synthetic_examples(a.rows, a.max_length, shape["vocab_size"])
        impl = "flex_attention" if ours else "sdpa"
        with torch.device("cuda"):  # initialised on the GPU: seconds, not minutes of CPU init for 8B
            model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), attn_implementation=impl, dtype=torch.bfloat16)
    else:
        examples, model_dir = cpu_examples(a.rows, a.max_length)
        impl = "sdpa"
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32)
        model_name = "SmolLM2-135M (embedded)"
    n_params = sum(p.numel() for p in model.parameters())
    lora = None
    if a.method == "lora":
        from peft import LoraConfig

        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        if not trl:  # TRL wraps the model itself (after adding its fused LM head)
            from peft import get_peft_model

            model = get_peft_model(model, lora)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad) if (lora is not None and not trl) else 0
    flops_per_token = 6 * n_params if a.method == "full" else 4 * n_params + 6 * n_lora

    mean_len = sum(len(e["input_ids"]) for e in examples) / len(examples)
    packed_batch = max(1, round(a.batch_size * mean_len / a.max_length))  # same tokens per step as the baseline
    if ours:
        data = pack_examples(examples, a.max_length)
        batch = packed_batch
    elif trl:  # TRL packs (BFD) and builds completion-only labels from this mask itself
        from datasets import Dataset

        data = Dataset.from_list([
            {"input_ids": e["input_ids"], "completion_mask": [int(x != -100) for x in e["labels"]]} for e in examples
        ])
        batch = packed_batch
    else:
        data = [{"input_ids": e["input_ids"], "labels": mask_first_label(e["labels"])} for e in examples]
        batch = a.batch_size
    collator = TokenCollator(0, packed=ours)

    def collate(batch):  # rows are unpadded here, so their lengths are the real tokens
        return {**collator(batch), "n_real": torch.tensor(sum(len(b["input_ids"]) for b in batch))}

    times: list[float] = []
    counts: list[tuple[int, int]] = []  # (trained, real) tokens of each step's batch, as trained
    slots = [0, 0]  # (real, all) token slots of the measured system's batches

    if trl:
        from trl import SFTConfig, SFTTrainer

        class Counting(SFTTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                if model.training:
                    real = int(inputs["position_ids"].numel())  # padding-free: every slot is a real token
                    counts.append((int((inputs["labels"][:, 1:] != -100).sum()), real))
                    slots[0] += real
                    slots[1] += real
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
    else:
        class Counting(FineTuneTrainer if ours else Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                inputs = dict(inputs)
                real = int(inputs.pop("n_real"))
                counts.append((int((inputs["labels"][:, 1:] != -100).sum()), real))
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        common = dict(
            output_dir=out, max_steps=a.warmup + a.steps, per_device_train_batch_size=batch, learning_rate=1e-4,
            logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=not cuda, bf16=cuda,
            disable_tqdm=True, dataloader_num_workers=0,
            optim="adamw_torch_fused" if (cuda and not a.path == "hf_padded") else "adamw_torch",
            torch_compile=cuda and ours, gradient_checkpointing=a.gradient_checkpointing, seed=0,
        )
        if trl:
            args = SFTConfig(**common, packing=True, packing_strategy="bfd", padding_free=True,
                             completion_only_loss=True, max_length=a.max_length)
            trainer = Counting(model=model, args=args, train_dataset=data, peft_config=lora, callbacks=[Clock()])
            if lora is not None:
                n_lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
                flops_per_token = 4 * n_params + 6 * n_lora
        else:
            args = TrainingArguments(**common, remove_unused_columns=False, label_names=["labels"])
            trainer = Counting(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Clock()])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        profile_table = None
        if a.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                trainer.train()
            key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            profile_table = prof.key_averages().table(sort_by=key, row_limit=15)
        else:
            trainer.train()
    if not trl:
        slots = [collator.real_tokens, collator.batch_tokens]
    w = a.warmup
    assert len(counts) == len(times) == w + a.steps, (len(counts), len(times))
    dt = sum(times[w:])
    trained = sum(c[0] for c in counts[w:])
    real = sum(c[1] for c in counts[w:])
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        device = torch.cuda.get_device_name(0)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, whole process
        device = "cpu"
    import importlib.metadata as md

    versions = {k: md.version(k) for k in ("torch", "transformers", "peft", "trl", "accelerate")}
    flops = flops_per_token * real / dt
    peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in device), None)
    return {
        "method": a.method, "path": a.path, "model": model_name, "params": n_params, "lora_params": n_lora,
        "attention": impl, "rows_per_step": batch, "max_length": a.max_length, "steps": a.steps,
        "step_s": dt / a.steps, "trained_tok_s": trained / dt, "real_tok_s": real / dt,
        "padding_share": 1 - slots[0] / max(1, slots[1]), "peak_mem_gib": peak,
        "model_tflop_s": flops / 1e12, "mfu": flops / peak_flops if peak_flops else None,
        "profile": profile_table, "versions": versions,
    }


# ---------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", choices=sorted(GPU_MODELS), default="1b", help="CUDA only: the model shape")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="baseline examples per step")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--systems", default="hf_padded,trl_best,ours", help="hf_padded, trl_best, ours")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of the --profile-systems rows")
    ap.add_argument("--profile-systems", default="ours")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    cuda = a.device == "cuda"
    defaults = GPU_DEFAULTS[a.model] if cuda else dict(steps=6, warmup=2, batch_size=8, max_length=512, rows=600)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.one:
        a.method, a.path = a.one
        print("RESULT " + json.dumps(run_one(a)), flush=True)
        return

    systems = a.systems.split(",")
    rows = []
    for method in a.methods.split(","):
        for path in systems:
            cmd = [sys.executable, "-m", "bench.train_speed", "--one", method, path, "--device", a.device, "--model", a.model]
            for k in defaults:
                cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
            if a.gradient_checkpointing:
                cmd.append("--gradient-checkpointing")
            if a.profile and path in a.profile_systems.split(","):
                cmd.append("--profile")
            print("running", method, path, flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{method}/{path} failed:\n{proc.stderr[-4000:]}")
            rows.append({**json.loads(line[len("RESULT "):]), "wall_s": round(time.perf_counter() - t0, 1)})
    for method in a.methods.split(","):
        by = {r["path"]: r for r in rows if r["method"] == method}
        for r in by.values():
            for ref in ("hf_padded", "trl_best"):
                if ref in by and r["path"] != ref:
                    r[f"x_{ref}"] = r["trained_tok_s"] / by[ref]["trained_tok_s"]
    cols = ["method", "path", "rows_per_step", "step_s", "trained_tok_s", "real_tok_s", "padding_share",
            "peak_mem_gib", "model_tflop_s", "mfu", "x_hf_padded", "x_trl_best", "wall_s"]
    print(f"\n{rows[0]['model']}, max_length {a.max_length}, {a.steps} measured steps after {a.warmup} warm-up")
    print_table(rows, cols)
    for r in rows:
        if r.get("profile"):
            print(f"\nprofile: {r['method']} / {r['path']}\n{r['profile']}")
    suffix = f"-{a.model}" if cuda and a.model != "1b" else ""
    path = write_result(f"train_speed-{a.device}{suffix}", {"args": {k: getattr(a, k) for k in defaults}, "rows": rows})
    print(f"wrote {path}")
    peers = {  # the side-by-side format, all rows from this one run
        "machine": device_name() if a.device == "cuda" else f"{device_name()}, {_mem_gib()} GiB RAM",
        "versions": rows[0]["versions"],
        "rows": [{"method": r["method"], "system": r["path"], "trained_tokens_per_s": round(r["trained_tok_s"], 2),
                  "peak_rss_mb" if a.device == "cpu" else "peak_gpu_mem_mb": round(r["peak_mem_gib"] * 1024, 1)}
                 for r in rows],
    }
    out = RESULTS / f"{a.device}_peers{suffix}.json"
    out.write_text(json.dumps(peers, indent=2) + "\n")
    print(f"wrote {out}")


def _mem_gib() -> int:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)


if __name__ == "__main__":
    main()

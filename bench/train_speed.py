"""Training speed: the naive path (HF Trainer, pad to longest, no packing) against ours.

    CPU (embedded 135M model, Alpaca-like data):  .venv/bin/python -m bench.train_speed
    GPU (~1.1B Llama from config, seq 2048, bf16): python -m bench.train_speed --device cuda
    GPU, 8B-class LoRA (Llama-3-8B shape):       python -m bench.train_speed --device cuda --model 8b \
                                                     --methods lora --gradient-checkpointing
    The GPU check's dry run on CPU (a tiny Llama from a config, as on the GPU; bench/gpu/check.sh):
                                                 python -m bench.train_speed --device cpu --model tiny --out DIR

Each row runs in its own process under ``--row-timeout``; a row that fails or times out is
recorded with its error and the others still run. The results file is rewritten after every
row (``--out`` DIR, else bench/results/), so a lease that ends mid-run keeps what finished.

Both rows use the HF Trainer on the same examples. Ours packs examples into
``max_length`` rows with a block-diagonal causal mask (no cross-example attention or
loss), uses flex attention on GPU (skips masked blocks) and the labelled-positions loss, as
the train task does (no torch.compile: the pipeline does not compile), with the train task's
weights: LoRA's frozen base in bf16, full fine-tuning's fp32 master weights under bf16 autocast
(``weights_dtype``, llm_finetune/training/weights.py). The peers train bf16 weights, as a bf16
checkpoint loads with dtype "auto"; each row records its ``weights_dtype``. Every row uses fused
AdamW on GPU, so the optimizer is not what differs. Each (method, path) runs in its own process so peak memory is its own.

Figures per row: trained tokens/s (labels that carry loss), real tokens/s (non-padding),
step time, peak memory, model FLOP/s and MFU. FLOPs per real token: full fine-tuning
6N (N = the parameters in matmuls: all but the input embedding, which is a lookup unless
tied to the LM head), plus attention's own matmuls over the pairs the masks allow
(12 x layers x heads x head_dim per allowed query-key pair, n(n+1)/2 pairs for an example of n tokens);
LoRA 4N + 6N_lora + the same attention term (forward 2N and activation gradients 2N through the frozen weights,
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
    # the dry run's model: the GPU rows' code path (built from a config, synthetic rows) in seconds on a CPU
    "tiny": ("Llama tiny (random init, dry run)", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=4096, max_position_embeddings=512)),
}
DEFAULT_MODEL = {"cuda": "1b", "cpu": "embedded"}
# per-model defaults on CUDA: the 8B-class LoRA row (issue 14: fits in 80 GB?) with activation checkpointing
GPU_DEFAULTS = {
    "1b": dict(steps=20, warmup=5, batch_size=16, max_length=2048, rows=4000),
    "8b": dict(steps=10, warmup=3, batch_size=8, max_length=2048, rows=2000),
    "tiny": dict(steps=2, warmup=1, batch_size=4, max_length=128, rows=64),
}
CPU_DEFAULTS = dict(steps=6, warmup=2, batch_size=8, max_length=512, rows=600)  # the embedded model on CPU


def bench_tokenizer():
    """A tokenizer for trainers that need one (TRL's SFTTrainer) when the model is built from a config
    and has no name to load one from: the GPU bundle's copy (LLM_FINETUNE_TEST_TOKENIZER), else the
    embedded model's."""
    from llm_finetune.model import load_tokenizer

    path = os.environ.get("LLM_FINETUNE_TEST_TOKENIZER") or str(embedded_model_dir())
    return load_tokenizer(path)


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

    from llm_finetune.training.collate import TokenCollator
    from llm_finetune.training.packing import mask_first_label, pack_examples
    from llm_finetune.training.trainer import FineTuneTrainer

    cuda = a.device == "cuda"
    ours, trl = a.path == "ours", a.path == "trl_best"
    torch.manual_seed(0)
    if a.model in GPU_MODELS:  # built from a config (no weights to download), synthetic rows
        model_name, shape = GPU_MODELS[a.model]
        examples = synthetic_examples(a.rows, a.max_length, shape["vocab_size"])
        from llm_finetune.training.precision import attention_implementation

        # packed rows (ours, and TRL's padding-free rows) get flex attention on Ampere and newer, which skips the
        # blocks their masks rule out (transformers builds the mask from the restarted position ids); SDPA on CPU
        # and for the padded baseline. Offline, flex is TRL's best kernel too: flash-attn is not installed there.
        impl = attention_implementation(packed=True) if (ours or trl) else "sdpa"
        if ours:  # the train task's own weights: LoRA's frozen base in bf16, fp32 masters for full fine-tuning
            from llm_finetune.config import TrainConfig
            from llm_finetune.training.attention import register
            from llm_finetune.training.weights import weights_dtype

            dtype = weights_dtype(TrainConfig(weights=a.method, precision="bf16" if cuda else "fp32"), bf16=cuda)
            if impl == "flex_attention":
                register()  # q, k, v of one dtype under autocast, as load_model does
        else:  # the peers: bf16 weights on the GPU, as a bf16 checkpoint loads with dtype "auto"
            dtype = torch.bfloat16 if cuda else torch.float32
        with torch.device(a.device):  # initialised on the GPU: seconds, not minutes of CPU init for 8B
            model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), attn_implementation=impl, dtype=dtype)
    else:
        examples, model_dir = cpu_examples(a.rows, a.max_length)
        impl = "sdpa"
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32)
        model_name = "SmolLM2-135M (embedded)"
    n_params = sum(p.numel() for p in model.parameters())
    # FLOPs count matmul weights only: the input embedding is a lookup (unless tied to the LM head,
    # whose matmul it then is), as in the usual 6N with N = non-embedding parameters (+ the head)
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed
    n_matmul = n_params - (0 if tied else embed.numel())
    lora = None
    if a.method == "lora":
        from peft import LoraConfig

        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        if not trl:  # TRL wraps the model itself (after adding its fused LM head)
            from peft import get_peft_model

            model = get_peft_model(model, lora)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad) if (lora is not None and not trl) else 0
    flops_per_token = 6 * n_matmul if a.method == "full" else 4 * n_matmul + 6 * n_lora

    mean_len = sum(len(e["input_ids"]) for e in examples) / len(examples)
    # attention's own matmuls (QK^T and AV) over the pairs the masks allow: each example attends causally
    # within itself, n(n+1)/2 pairs, whatever the system does with padding or packing. 4 * hidden FLOPs a
    # pair forward, 3x for forward + backward (activation gradients flow through it with LoRA too).
    cfg = model.config
    lens = [len(e["input_ids"]) for e in examples]
    pairs_per_token = sum(n * (n + 1) / 2 for n in lens) / sum(lens)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention_per_token = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * pairs_per_token
    flops_per_token += attention_per_token
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
            optim="adamw_torch_fused" if cuda else "adamw_torch",  # the same optimizer for every row
            # no torch.compile: "ours" is the pipeline's own step, and the pipeline does not compile
            gradient_checkpointing=a.gradient_checkpointing, seed=0,
        )
        if trl:
            args = SFTConfig(**common, packing=True, packing_strategy="bfd", padding_free=True,
                             completion_only_loss=True, max_length=a.max_length)
            # the tokenizer explicitly: a model built from a config has no name to load one from ("")
            trainer = Counting(model=model, args=args, train_dataset=data, peft_config=lora, callbacks=[Clock()],
                               processing_class=bench_tokenizer())
            if lora is not None:
                n_lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
                flops_per_token = 4 * n_matmul + 6 * n_lora + attention_per_token
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
        "attention": impl, "weights_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "rows_per_step": batch, "max_length": a.max_length, "steps": a.steps,
        "step_s": dt / a.steps, "trained_tok_s": trained / dt, "real_tok_s": real / dt,
        "padding_share": 1 - slots[0] / max(1, slots[1]), "peak_mem_gib": peak,
        "model_tflop_s": flops / 1e12, "mfu": flops / peak_flops if peak_flops else None,
        "profile": profile_table, "versions": versions,
    }


# ---------------------------------------------------------------- driver
def _row(a: argparse.Namespace, method: str, path: str, defaults: dict) -> dict:
    """One (method, path) in its own process; its figures, or its error (a failed or timed-out row)."""
    cmd = [sys.executable, "-m", "bench.train_speed", "--one", method, path, "--device", a.device, "--model", a.model]
    for k in defaults:
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    if a.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if a.profile and path in a.profile_systems.split(","):
        cmd.append("--profile")
    print(f"running {method} / {path}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.row_timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"method": method, "path": path, "error": f"timed out after {a.row_timeout}s", "stderr_tail": tail,
                "wall_s": round(time.perf_counter() - t0, 1)}
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    wall = round(time.perf_counter() - t0, 1)
    if line is None:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  FAILED ({wall}s): {last}", flush=True)
        return {"method": method, "path": path, "error": last, "stderr_tail": proc.stderr[-4000:], "wall_s": wall}
    row = {**json.loads(line[len("RESULT "):]), "wall_s": wall}
    print(f"  {row['trained_tok_s']:,.1f} trained tokens/s, peak {row['peak_mem_gib']:.2f} GiB ({wall}s)", flush=True)
    return row


def _compare(rows: list[dict]) -> None:
    """x_<peer>: trained tokens/s against each peer row of the same method, from this one run."""
    ok = [r for r in rows if "error" not in r]
    for method in {r["method"] for r in ok}:
        by = {r["path"]: r for r in ok if r["method"] == method}
        for r in by.values():
            for ref in ("hf_padded", "trl_best"):
                if ref in by and r["path"] != ref:
                    r[f"x_{ref}"] = r["trained_tok_s"] / by[ref]["trained_tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", choices=[*sorted(GPU_MODELS), "embedded"], default=None,
                    help="cuda: 1b (default) or 8b; cpu: embedded (default) or tiny (the GPU check's dry run)")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="baseline examples per step")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--systems", default="ours,trl_best,hf_padded", help="in run order: ours, trl_best, hf_padded")
    ap.add_argument("--row-timeout", type=int, default=240, help="seconds one row may take before it is recorded as failed")
    ap.add_argument("--out", default=None, help="directory for the results (default bench/results)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of the --profile-systems rows")
    ap.add_argument("--profile-systems", default="ours")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    cuda = a.device == "cuda"
    a.model = a.model or DEFAULT_MODEL[a.device]
    if a.model == "embedded" and cuda:
        ap.error("--model embedded is the CPU benchmark; on cuda use 1b, 8b or tiny")
    defaults = GPU_DEFAULTS[a.model] if a.model in GPU_DEFAULTS else CPU_DEFAULTS
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.one:
        a.method, a.path = a.one
        print("RESULT " + json.dumps(run_one(a)), flush=True)
        return

    suffix = f"-{a.model}" if a.model != DEFAULT_MODEL[a.device] else ""
    row_name = f"train_speed-{a.device}{suffix}"  # + -<method>-<system>.json, one file per finished row
    if a.methods != "lora,full":  # a partial run (the GPU check runs LoRA and full separately): its own file
        suffix += "-" + a.methods.replace(",", "-")
    name = f"train_speed-{a.device}{suffix}"
    directory = Path(a.out) if a.out else RESULTS
    rows: list[dict] = []
    path = None
    for method in a.methods.split(","):
        for system in a.systems.split(","):
            rows.append(_row(a, method, system, defaults))
            _compare(rows)
            # one file per finished row as well, named by what it measured
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"{row_name}-{method}-{system}.json").write_text(json.dumps(rows[-1], indent=2) + "\n")
            # after every row: a lease that ends, or a row that dies, keeps what finished
            path = write_result(name, {"args": {k: getattr(a, k) for k in defaults}, "model": a.model, "rows": rows,
                                       "complete": False}, directory)
    path = write_result(name, {"args": {k: getattr(a, k) for k in defaults}, "model": a.model, "rows": rows,
                               "complete": True}, directory)
    ok = [r for r in rows if "error" not in r]
    cols = ["method", "path", "rows_per_step", "step_s", "trained_tok_s", "real_tok_s", "padding_share",
            "peak_mem_gib", "model_tflop_s", "mfu", "x_hf_padded", "x_trl_best", "wall_s"]
    if ok:
        print(f"\n{ok[0]['model']}, max_length {a.max_length}, {a.steps} measured steps after {a.warmup} warm-up")
        print_table(ok, cols)
    for r in rows:
        if r.get("profile"):
            print(f"\nprofile: {r['method']} / {r['path']}\n{r['profile']}")
        if "error" in r:
            print(f"\nFAILED {r['method']} / {r['path']}: {r['error']}\n{r['stderr_tail'][-1500:]}")
    print(f"wrote {path}")
    if ok:
        peers = {  # the side-by-side format, all rows from this one run
            "machine": device_name() if cuda else f"{device_name()}, {_mem_gib()} GiB RAM",
            "model": ok[0]["model"],
            "versions": ok[0]["versions"],
            "rows": [{"method": r["method"], "system": r["path"], "trained_tokens_per_s": round(r["trained_tok_s"], 2),
                      "peak_rss_mb" if not cuda else "peak_gpu_mem_mb": round(r["peak_mem_gib"] * 1024, 1)}
                     for r in ok],
        }
        out = directory / f"{a.device}_peers{suffix}.json"
        out.write_text(json.dumps(peers, indent=2) + "\n")
        print(f"wrote {out}")
    if len(ok) < len(rows):
        sys.exit(f"{len(rows) - len(ok)} of {len(rows)} rows failed (recorded in {path})")


def _mem_gib() -> int:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)


if __name__ == "__main__":
    main()

"""Test helpers: a tiny random Llama (trains in seconds on CPU) and a 2-process torchrun launcher."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def tiny_llama_config(tokenizer, **overrides):
    """A 2-layer Llama with the real tokenizer's vocabulary; ``overrides`` change any field."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaConfig(**{**fields, **overrides})


def save_tiny_llama(out: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(tokenizer, **overrides)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def run_torchrun(spec: dict, tmp_path, timeout: int = 240, worker: str = "dist_worker.py") -> subprocess.CompletedProcess:
    """torchrun with 2 processes running ``tests/<worker>``; on timeout the whole process group is killed."""
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(root / "tests" / worker), str(path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout}s (hang):\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

"""Multi-node ZeRO: both nodes' shards reach the store, and a killed run resumes on both nodes.

Two torchrun "nodes" on loopback (``--nnodes 2 --node_rank 0/1``, c10d rendezvous, one
process each), each with its own training directory and TMPDIR, as pods on different
machines have. The store is a directory both reach, as an object store is. A run that
fails after step 5 (checkpoints at 2 and 4) is resumed by fresh "pods" and must end with
the losses and weights of an uninterrupted run.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_finetune.checkpoint import COMPLETE_MARKER, checkpoint_problem
from llm_finetune.config import DataConfig
from llm_finetune.data.prepare import prepare
from tests.tiny import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(spec: dict, run_dir: Path, timeout: int = 420) -> list[tuple[int, str]]:
    """Launch both nodes; return (exit code, log) per node."""
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(spec))
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = []
    for node in range(2):
        node_dir = run_dir / f"node{node}"
        (node_dir / "tmp").mkdir(parents=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "TMPDIR": str(node_dir / "tmp")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={run_dir.name}",
               f"--rdzv_conf=join_timeout=120,is_host={int(node == 0)}", "--max_restarts=0",
               str(ROOT / "tests" / "two_node_zero_worker.py"), str(run_dir / "spec.json"), str(node_dir)]
        log = open(node_dir / "log.txt", "w")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), node_dir))
    out = []
    for proc, node_dir in procs:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            pytest.fail(f"two-node run still going after {timeout}s: {(node_dir / 'log.txt').read_text()[-3000:]}")
        out.append((rc, (node_dir / "log.txt").read_text()))
    return out


def _result(run_dir: Path) -> dict:
    (path,) = list(run_dir.glob("node*/result.json"))  # global rank 0's node
    return json.loads(path.read_text())


def _weights(result: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(result["model_dir"]) / "model.safetensors"))


@pytest.mark.slow
def test_two_node_zero2_run_killed_after_a_checkpoint_resumes_on_both_nodes(tmp_path, tokenizer):
    model = save_tiny_llama(tmp_path / "tiny", tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    data = tmp_path / "train.parquet"
    prepare(DataConfig(), tokenizer).train.head(64).to_parquet(data)
    train = {"method": "full", "max_steps": 8, "save_steps": 2, "eval_steps": 0, "per_device_batch_size": 2,
             "learning_rate": 1e-2, "warmup_ratio": 0.0, "logging_steps": 1, "keep_checkpoints": 2,
             "nnodes": 2, "nproc_per_node": 1, "collective_timeout_s": 120}
    base = {"model_dir": str(model), "data": str(data), "deepspeed": "zero2", "train": train}

    clean = _two_nodes({**base, "store": str(tmp_path / "store-clean")}, tmp_path / "clean")
    assert all(rc == 0 for rc, _ in clean), clean[0][1][-3000:] + clean[1][1][-3000:]

    store = tmp_path / "store"
    failed = _two_nodes({**base, "store": str(store), "fail_at": 5}, tmp_path / "killed")
    assert all(rc != 0 and "injected failure at step 5" in log for rc, log in failed)
    # both nodes' parts of the last checkpoint reached the store: each node's ZeRO optimizer shard and manifest
    ckpt = store / "checkpoint-4"
    assert sorted(p.name for p in store.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in ckpt.glob(f"{COMPLETE_MARKER}.node*")) == [f"{COMPLETE_MARKER}.node0", f"{COMPLETE_MARKER}.node1"]
    shards = sorted(p.name for p in ckpt.glob("global_step4/*optim_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)], shards  # rank 1 is node 1's
    assert checkpoint_problem(ckpt) is None

    resumed = _two_nodes({**base, "store": str(store)}, tmp_path / "resumed")
    assert all(rc == 0 for rc, _ in resumed), resumed[0][1][-3000:] + resumed[1][1][-3000:]
    a, b = _result(tmp_path / "clean"), _result(tmp_path / "resumed")
    assert b["resumed_from_step"] == 4 and b["steps"] == a["steps"] == 8 and b["world_size"] == 2
    for step in range(5, 9):
        assert b["losses"][str(step)] == pytest.approx(a["losses"][str(step)], rel=1e-4, abs=1e-5), step
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-4, atol=1e-6), name
    # the store ends with at most keep_checkpoints, the newest complete with both nodes' parts
    assert sorted(p.name for p in store.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert checkpoint_problem(store / "checkpoint-8") is None

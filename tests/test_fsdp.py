"""FSDP2 (``train.sharding: fsdp2``) on CPU processes (torchrun, gloo) with the tiny model.

1. Two processes train full and LoRA weights: FSDP2 really shards (fully_shard modules, sharded
   checkpoints), the loss falls, a full-weight run matches DDP's losses and weights, generations
   run on every rank, and ``model/`` (and ``adapter/``) load with ``from_pretrained``.
2. A run whose rank 1 is killed after a checkpoint resumes from the checkpoint store (the
   ``__<rank>_0.distcp`` shards of both ranks) and ends as the uninterrupted run does.
3. Two "nodes" on loopback, one process each, train together, each node's checkpoint on its own
   disk: node 1 stores only its rank's shards, and loads the best checkpoint with rank 0's metadata.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_finetune.config import DataConfig
from llm_finetune.data.prepare import prepare
from tests.tiny import run_torchrun, save_tiny_llama

pytestmark = pytest.mark.slow  # every test here starts processes that train (tests/tiers.py)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer)


def _train(weights: str, **overrides) -> dict:
    return {"weights": weights, "sharding": "fsdp2", "max_steps": 8, "per_device_batch_size": 4,
            "learning_rate": 3e-3 if weights == "full" else 1e-2, "logging_steps": 1, "warmup_ratio": 0.0,
            "lora": {"r": 8}, **overrides}


def _run(spec: dict, tmp_path: Path, name: str):
    work = tmp_path / name
    work.mkdir()
    return run_torchrun({**spec, "out_dir": str(tmp_path / name / "out")}, work)


def _losses(summary: dict) -> dict:
    return {h["step"]: h["loss"] for h in summary["log_history"] if "loss" in h}


def _summary(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / name / "out" / "train_summary.json").read_text())


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


@pytest.mark.parametrize("weights", ["full", "lora"])
def test_fsdp2_two_process_cpu_training(weights, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    # LoRA also checkpoints activations (transformers' own under FSDP2, see fsdp.fsdp_activation_checkpointing)
    train = _train(weights, save_steps=4, eval_steps=4, eval_max_samples=8, sample_prompts=2, sample_max_new_tokens=4,
                   gradient_checkpointing=weights == "lora")
    proc = _run({"model_dir": str(tiny_dir), "train": train}, tmp_path, "fsdp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # really sharded (accelerate falls back to DDP on CPU without a word unless fsdp.py steps in)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("[sharding]")), "")
    assert "fsdp_modules=0" not in line and line, proc.stdout[-3000:]
    assert f"fsdp_checkpointed=0 hf_checkpointing={weights == 'lora'}" in line, line
    out = tmp_path / "fsdp" / "out"
    s = _summary(tmp_path, "fsdp")
    assert s["world_size"] == 2 and s["steps"] == 8 and s["best_step"] in (4, 8)
    assert s["final_loss"] < s["first_loss"] - 0.2
    assert len(s["samples"]) == 2 * 2  # sharded weights: every rank generates in step
    for ckpt in ("checkpoint-4", "checkpoint-8"):  # torch.distributed.checkpoint shards, one file per rank
        for sub in ("pytorch_model_fsdp_0", "optimizer_0"):
            names = sorted(p.name for p in (out / "checkpoints" / ckpt / sub).iterdir())
            assert names == [".metadata", "__0_0.distcp", "__1_0.distcp"], (ckpt, sub, names)

    model = AutoModelForCausalLM.from_pretrained(out / "model")  # gathered on rank 0 (merged for LoRA)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    changed = [n for (n, p), q in zip(model.state_dict().items(), base.state_dict().values()) if not torch.equal(p, q)]
    assert changed and model.model.embed_tokens.weight.shape == base.model.embed_tokens.weight.shape
    assert sorted(_weights(out / "model")) == sorted(_weights(tiny_dir))  # tied embeddings stored once, as the base
    if weights == "lora":
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(base, out / "adapter")
        ids = torch.randint(0, 500, (1, 10))
        with torch.no_grad():
            assert torch.allclose(adapted(ids).logits, model(ids).logits, atol=1e-4)
        return
    # the same run with DDP (train.sharding: none): the same losses and, to float rounding, the same weights
    ddp = _run({"model_dir": str(tiny_dir), "train": {**train, "sharding": "none"}}, tmp_path, "ddp")
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-5000:]
    a, b = _losses(s), _losses(_summary(tmp_path, "ddp"))
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-4), step
    wa, wb = _weights(out / "model"), _weights(tmp_path / "ddp" / "out" / "model")
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("weights", ["full", "lora"])
def test_fsdp2_run_killed_after_a_checkpoint_resumes_from_the_store(weights, tiny_dir, tmp_path):
    """Rank 1 dies abruptly (os._exit, as under SIGKILL) at step 7; checkpoint-6 (both ranks' model and optimizer
    shards, RNG states) is in the store; a new launch restores it and ends where the uninterrupted run ends.
    The full-weight runs checkpoint activations with FSDP's wrappers (whose names the state dicts leave out)."""
    train = _train(weights, save_steps=3, eval_steps=0, warmup_ratio=0.1, gradient_checkpointing=weights == "full")
    spec = {"model_dir": str(tiny_dir), "train": train}
    clean = _run(spec, tmp_path, "clean")
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-5000:]
    if weights == "full":
        assert "fsdp_checkpointed=2 hf_checkpointing=False" in clean.stdout, clean.stdout[-3000:]  # both layers

    store = {"root": str(tmp_path / "store"), "delay_s": 0}
    killed = _run({**spec, "store": store, "fault": {"rank": 1, "step": 7, "mode": "exit"}}, tmp_path, "attempt1")
    assert killed.returncode != 0 and "[fault] rank 1 exits at step 7" in killed.stdout, killed.stdout[-3000:]
    newest = tmp_path / "store" / "checkpoint-6"
    manifest = json.loads((newest / "CHECKPOINT_COMPLETE.node0").read_text())["files"]
    for sub in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {f"{sub}/.metadata", f"{sub}/__0_0.distcp", f"{sub}/__1_0.distcp"} <= set(manifest), sorted(manifest)

    resumed = _run({**spec, "store": store}, tmp_path, "attempt2")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    a, b = _summary(tmp_path, "clean"), _summary(tmp_path, "attempt2")
    assert b["resumed_from_step"] == 6 and a["steps"] == b["steps"] == 8
    la, lb = _losses(a), _losses(b)
    assert sorted(lb) == sorted(la)  # the resumed run's log history goes back to step 1 (trainer_state.json)
    for step in (7, 8):  # model, optimizer, scheduler, RNG and data position restored from the shards
        assert lb[step] == pytest.approx(la[step], rel=1e-4, abs=1e-4), step
    lr = [[h["learning_rate"] for h in s["log_history"] if "loss" in h and h["step"] > 6] for s in (a, b)]
    assert lr[0] == lr[1] and len(lr[0]) == 2  # the scheduler continued, not restarted
    wa, wb = _weights(tmp_path / "clean" / "out" / "model"), _weights(tmp_path / "attempt2" / "out" / "model")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-3, atol=1e-5, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_on_two_nodes_each_with_its_own_disk(tokenizer, tmp_path):
    """Two torchrun launchers (``--nnodes 2 --node_rank 0|1``, one process each) train 4 steps with FSDP2, a
    checkpoint and a validation every 2 steps; each node writes its own directory and uploads its part of each
    checkpoint to one store. Node 1's part is its rank's shards; it loads the best checkpoint at the end from its
    own disk with rank 0's ``.metadata`` (copied there after each save)."""
    tiny = save_tiny_llama(tmp_path / "tiny", tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    data = tmp_path / "train.parquet"
    prepare(DataConfig(), tokenizer).train.head(64).to_parquet(data)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"train": {"sharding": "fsdp2", "max_steps": 4, "save_steps": 2, "eval_steps": 2,
                                          "eval_max_samples": 8, "sample_prompts": 0, "learning_rate": 3e-3},
                                "store": str(tmp_path / "store"), "eval_rows": 8}))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    nodes = []
    for node in range(2):
        out = tmp_path / f"node{node}"
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "--max_restarts", "0",
               str(ROOT / "tests" / "two_node_worker.py"), str(tiny), str(data), str(out), str(spec)]
        log = open(out / "log.txt", "w")
        nodes.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), out))
    try:
        for proc, out in nodes:
            assert proc.wait(timeout=240) == 0, (out / "log.txt").read_text()[-4000:]
    finally:
        for proc, _ in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)

    records = [json.loads(next(out.glob("rank*.json")).read_text()) for _, out in nodes]
    assert sorted(int(r["env"]["GROUP_RANK"]) for r in records) == [0, 1]
    assert all(r["backend"] == "gloo" and r["dist_world_size"] == 2 and r["steps"] == 4 for r in records)
    assert records[0]["before"] == records[1]["before"] and records[0]["after"] == records[1]["after"]
    assert records[0]["after"] != records[0]["before"]
    summary = json.loads((tmp_path / "node0" / "train" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["best_step"] in (2, 4)

    node1 = tmp_path / "node1" / "train" / "checkpoints" / "checkpoint-4"
    manifest = json.loads((node1 / "CHECKPOINT_COMPLETE.node1").read_text())
    assert sorted(manifest["files"]) == ["optimizer_0/__1_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp",
                                         "rng_state_1.pth"]
    assert (node1 / "pytorch_model_fsdp_0" / ".metadata").is_file()  # rank 0's, copied to node 1's disk
    assert not (node1 / "pytorch_model_fsdp_0" / "__0_0.distcp").exists()  # rank 0's shard stays on node 0
    stored = tmp_path / "store" / "checkpoint-4"
    assert {p.name for p in stored.glob("CHECKPOINT_COMPLETE.node*")} == {"CHECKPOINT_COMPLETE.node0",
                                                                          "CHECKPOINT_COMPLETE.node1"}
    assert sorted(p.name for p in (stored / "optimizer_0").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "node0" / "train" / "model")

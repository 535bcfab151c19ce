"""Two "nodes" (two torchrun launchers on loopback, one process each) train one step together.

This is the rendezvous a 2-node PyTorchJob gets from the Elastic task: c10d, min = max = 2
nodes, the endpoint the operator puts in PET_RDZV_ENDPOINT. The launch arguments are taken
from the Elastic task the dynamic builds for ``nnodes: 2`` (tasks/elastic.py), and each
node writes to its own directory, as pods on different machines would.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_finetune.config import DataConfig, TrainConfig
from llm_finetune.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_llama(tmp_path, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_two_nodes_rendezvous_over_c10d_and_train_one_step_together(tiny_llama, tokenizer, tmp_path):
    from tasks.elastic import configure_elastic
    from tasks.train import elastic_config, train_elastic

    task = configure_elastic(train_elastic, elastic_config(TrainConfig(nnodes=2, nproc_per_node=1)))
    assert task.task_type == "pytorch"
    data = tmp_path / "train.parquet"
    prepare(DataConfig(), tokenizer).train.head(64).to_parquet(data)

    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    nodes = []
    for node in range(2):
        out = tmp_path / f"node{node}"
        out.mkdir()
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={task.min_nodes}:{task.max_nodes}", f"--nproc_per_node={task.task_config.nproc_per_node}",
            f"--rdzv_backend={task.rdzv_backend}", f"--rdzv_endpoint={endpoint}", "--rdzv_id=two-node-test",
            f"--rdzv_conf=join_timeout=120,is_host={int(node == 0)}", f"--max_restarts={task.task_config.max_restarts}",
            str(ROOT / "tests" / "two_node_worker.py"), str(tiny_llama), str(data), str(out),
        ]
        log = open(out / "log.txt", "w")
        nodes.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), out))
    for proc, out in nodes:
        rc = proc.wait(timeout=240)
        assert rc == 0, (out / "log.txt").read_text()[-4000:]

    records = [json.loads(next(out.glob("rank*.json")).read_text()) for _, out in nodes]
    envs = [r["env"] for r in records]
    assert sorted(int(e["RANK"]) for e in envs) == [0, 1]  # both joined, distinct global ranks
    assert sorted(int(e["GROUP_RANK"]) for e in envs) == [0, 1]  # one per node
    assert all(e["WORLD_SIZE"] == "2" and e["LOCAL_WORLD_SIZE"] == "1" and e["LOCAL_RANK"] == "0" for e in envs)
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"], e["TORCHELASTIC_RUN_ID"]) for e in envs}) == 1
    assert all(r["backend"] == "gloo" and r["dist_world_size"] == 2 and r["steps"] == 1 for r in records)
    assert records[0]["before"] == records[1]["before"]  # same seed, same start
    assert records[0]["after"] == records[1]["after"]  # one all-reduced step: identical weights on both nodes
    assert records[0]["after"] != records[0]["before"]  # and the step changed them
    # rank 0 (on whichever node it landed) wrote the model and the summary of a 2-process run
    (summary,) = [json.loads(p.read_text()) for _, out in nodes for p in out.glob("train/train_summary.json")]
    assert summary["world_size"] == 2 and summary["steps"] == 1

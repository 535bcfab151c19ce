"""Two "nodes" on loopback, one process each, train one step together over c10d.

1. Two torchrun launchers with the launch arguments of the Elastic task the dynamic builds
   for ``nnodes: 2`` (tasks/elastic.py); each rank records its environment and weights.
2. Two "pods": the serialized task's own container command (``pyflyte-execute`` with the
   Elastic resolver) run twice with the PET_* variables the Kubeflow operator sets, so
   the path a PyTorchJob takes (resolver -> flytekit's elastic launch -> train) is the one
   exercised. Each node writes to its own directory, as pods on different machines would.
"""

import json
import os
import typing
from collections import OrderedDict
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llm_finetune.config import DataConfig, TrainConfig
from llm_finetune.data.prepare import prepare
from tests.tiny import save_tiny_llama

pytestmark = pytest.mark.slow  # every test here trains a model or starts a process (tests/tiers.py)

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny"), tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
    )


@pytest.fixture(scope="module")
def train_frame(tokenizer):
    return prepare(DataConfig(), tokenizer).train.head(64)


def test_two_nodes_rendezvous_over_c10d_and_train_one_step_together(tiny_llama, train_frame, tmp_path):
    from tasks.elastic import configure_elastic
    from tasks.train import elastic_config, train_elastic

    task = configure_elastic(train_elastic, elastic_config(TrainConfig(nnodes=2, nproc_per_node=1)))
    assert task.task_type == "pytorch"
    data = tmp_path / "train.parquet"
    train_frame.to_parquet(data)

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


def test_two_pods_run_the_serialized_pytorchjob_command(tiny_llama, train_frame, tmp_path):
    from flytekit.configuration import ImageConfig, SerializationSettings
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine
    from flytekit.models.literals import LiteralMap
    from flytekit.tools.translator import get_serializable
    from flytekit.types.directory import FlyteDirectory
    from flytekit.types.structured import StructuredDataset
    from flyteidl.core import literals_pb2

    from tasks.elastic import configure_elastic
    from llm_finetune.config import split_train
    from tasks.train import TrainResult, elastic_config, train_elastic

    train = TrainConfig(weights="full", max_steps=1, per_device_batch_size=2, warmup_ratio=0.0, logging_steps=1,
                        nnodes=2, nproc_per_node=1)
    task = configure_elastic(train_elastic, elastic_config(train))
    spec = get_serializable(OrderedDict(), SerializationSettings(image_config=ImageConfig.auto_default_image()), task)
    assert spec.template.type == "pytorch"
    ctx = FlyteContextManager.current_context()
    inputs = {"base_model": FlyteDirectory(str(tiny_llama)), "train_data": StructuredDataset(dataframe=train_frame),
              "eval_data": StructuredDataset(dataframe=train_frame.head(8)), "data": DataConfig(),
              **dict(zip(("train", "train_ops"), split_train(train)))}
    lm = TypeEngine.dict_to_literal_map(ctx, inputs, task.python_interface.inputs)
    (tmp_path / "inputs.pb").write_bytes(lm.to_flyte_idl().SerializeToString())

    port = _free_port()
    pods = []
    for pod in range(2):
        out = tmp_path / f"pod{pod}"
        out.mkdir()
        values = {"{{.input}}": str(tmp_path / "inputs.pb"), "{{.outputPrefix}}": str(out / "out"),
                  "{{.rawOutputDataPrefix}}": str(out / "raw")}
        args = [values.get(a, a) for a in spec.template.container.args]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LLM_FINETUNE_DECK_DIR": str(out / "decks"),
               # what the training operator and propeller give each worker pod of the PyTorchJob
               "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_RDZV_BACKEND": "c10d",
               "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}", "FLYTE_INTERNAL_EXECUTION_ID": "two-pods"}
        log = open(out / "log.txt", "w")
        exe = Path(sys.executable).with_name(args[0])
        pods.append((subprocess.Popen([exe, *args[1:]], env=env, cwd=out, stdout=log, stderr=subprocess.STDOUT), out))
    for proc, out in pods:
        assert proc.wait(timeout=300) == 0, (out / "log.txt").read_text()[-4000:]

    # global rank 0's pod writes the task's outputs; the other pod writes nothing (IgnoreOutputs), no error
    written = [out for _, out in pods if (out / "out" / "outputs.pb").exists()]
    assert len(written) == 1 and not any((out / "out" / "error.pb").exists() for _, out in pods)
    msg = literals_pb2.LiteralMap()
    msg.ParseFromString((written[0] / "out" / "outputs.pb").read_bytes())
    outputs = LiteralMap.from_flyte_idl(msg).literals
    result = TrainResult(**{
        name: TypeEngine.to_python_value(ctx, outputs[name], tp) for name, tp in typing.get_type_hints(TrainResult).items()
    })
    assert result.world_size == 2 and result.steps == 1 and result.adapter is None

"""Multi-node ZeRO-3 across Flyte attempts: two "pods" per attempt, each attempt its own checkpoint prefix.

On a cluster a ``train.nnodes: 2`` task is a PyTorchJob: every pod runs the task's container
command (``pyflyte-execute`` with the Elastic task that ``train_model`` configures), all pods of
an attempt share the attempt's checkpoint prefix, and a retry is given only the failed
attempt's prefix to read (propeller). Here both pods run that command on loopback, each in
its own directory and TMPDIR (its own disk), with ``PET_RDZV_ENDPOINT`` as the training
operator sets it. Attempt 0 fails after checkpoint-4 (rank 1 meets a connection reset);
attempt 1, a new prefix, must resume on both nodes and end with the losses and weights of an
uninterrupted run, while attempt 0's prefix is left as it was.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from llm_finetune.training.checkpoint import COMPLETE_MARKER, checkpoint_problem
from tests.test_multinode import _free_port
from tests.test_retries import BIN, FAULT, ROOT, _error_kind, _serialized_args


def _two_pods(task, inputs: dict, run_dir: Path, checkpoint: Path, prev: str = "", env: dict | None = None,
              timeout: int = 300) -> list[Path]:
    """One attempt: both pods' container commands, sharing the attempt's checkpoint prefix; their directories."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine

    run_dir.mkdir(parents=True)
    lm = TypeEngine.dict_to_literal_map(FlyteContextManager.current_context(), inputs, task.python_interface.inputs)
    (run_dir / "inputs.pb").write_bytes(lm.to_flyte_idl().SerializeToString())
    endpoint = f"127.0.0.1:{_free_port()}"
    pods = []
    for node in range(2):
        pod = run_dir / f"pod{node}"
        (pod / "tmp").mkdir(parents=True)
        values = {
            "{{.input}}": str(run_dir / "inputs.pb"), "{{.outputPrefix}}": str(pod / "out"),
            "{{.rawOutputDataPrefix}}": str(pod / "raw"), "{{.checkpointOutputPrefix}}": str(checkpoint),
            "{{.prevCheckpointPrefix}}": prev,
        }
        args = [values.get(a, a) for a in _serialized_args(task)]
        pod_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "TMPDIR": str(pod / "tmp"), "LLM_FINETUNE_DECK_DIR": str(pod / "decks"),
                   "PET_RDZV_ENDPOINT": endpoint, "PET_NNODES": "2",
                   # the execution id is the rendezvous id (flytekit's LaunchConfig run_id): the same in both pods
                   "FLYTE_INTERNAL_EXECUTION_PROJECT": "p", "FLYTE_INTERNAL_EXECUTION_DOMAIN": "d",
                   "FLYTE_INTERNAL_EXECUTION_ID": run_dir.name, **(env or {})}
        log = open(pod / "log.txt", "w")
        pods.append((subprocess.Popen([BIN / args[0], *args[1:]], cwd=pod, env=pod_env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True), pod))
    for proc, pod in pods:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p, _ in pods:
                os.killpg(p.pid, 9)
            pytest.fail(f"two-pod attempt still going after {timeout}s:\n" + "\n".join(
                (d / "log.txt").read_text()[-3000:] for _, d in pods))
    return [pod for _, pod in pods]


def _logs(pods: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n" + (p / "log.txt").read_text()[-3000:] for p in pods)


def _rank0(pods: list[Path]) -> dict:
    """Global rank 0's outputs (the pod that won rank 0 in the rendezvous writes them; the other none)."""
    from flyteidl.core import literals_pb2
    from flytekit.models.literals import LiteralMap
    from safetensors.torch import load_file

    (pod,) = [p for p in pods if (p / "out" / "outputs.pb").exists()]
    msg = literals_pb2.LiteralMap()
    msg.ParseFromString((pod / "out" / "outputs.pb").read_bytes())
    lit = LiteralMap.from_flyte_idl(msg).literals
    model_dir = Path(lit["model"].scalar.blob.uri.removeprefix("file://"))
    summary = json.loads(Path(lit["metrics"].scalar.blob.uri.removeprefix("file://")).read_text())
    weights = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(f))
    return {"weights": weights, "resumed_from_step": lit["resumed_from_step"].scalar.primitive.integer,
            "steps": lit["steps"].scalar.primitive.integer, "world_size": lit["world_size"].scalar.primitive.integer,
            "losses": {h["step"]: h["loss"] for h in summary["log_history"] if "loss" in h}}


@pytest.mark.slow
def test_a_two_node_zero3_attempt_killed_after_a_checkpoint_is_resumed_by_the_next_attempt_from_its_own_prefix(
        tmp_path, tokenizer):
    from flytekit.types.directory import FlyteDirectory
    from flytekit.types.structured import StructuredDataset

    from llm_finetune.config import DataConfig, TrainConfig, join_train, split_train
    from llm_finetune.data.prepare import prepare
    from tasks.elastic import configure_elastic
    from tasks.train import elastic_config, train_elastic
    from tests.tiny import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny", tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    cfg = TrainConfig(weights="full", deepspeed="zero3", nnodes=2, nproc_per_node=1, max_steps=8, save_steps=2,
                      eval_steps=0, per_device_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, logging_steps=1,
                      keep_checkpoints=2, collective_timeout_s=120, sample_prompts=0)
    train, ops = split_train(cfg)
    # the task as train_model builds it for nnodes: 2 (a PyTorchJob of two pods), through its resolver
    task = configure_elastic(train_elastic, elastic_config(join_train(train, ops)))
    assert task.min_nodes == task.max_nodes == 2
    inputs = {
        "base_model": FlyteDirectory(str(model)),
        "train_data": StructuredDataset(dataframe=prepare(DataConfig(), tokenizer).train_tokens.head(64)),
        "eval_data": StructuredDataset(dataframe=prepare(DataConfig(), tokenizer).validation.head(4)),
        "data": DataConfig(), "train": train, "train_ops": ops,
    }
    clean_pods = _two_pods(task, inputs, tmp_path / "clean", tmp_path / "clean-checkpoint")
    assert all(not (p / "out" / "error.pb").exists() for p in clean_pods), _logs(clean_pods)
    clean = _rank0(clean_pods)
    assert clean["world_size"] == 2 and clean["steps"] == 8

    # attempt 0: rank 1 meets a connection reset at step 5, after checkpoint-4 was stored by both nodes
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(FAULT)
    fault_env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "fault"), str(ROOT)]), "TEST_FAULT_AT_STEP": "5"}
    attempt0 = tmp_path / "attempt0-checkpoint"
    failed = _two_pods(task, inputs, tmp_path / "attempt0", attempt0, env=fault_env)
    for pod in failed:
        assert (pod / "out" / "error.pb").exists(), _logs(failed)
        kind, message = _error_kind(pod)
        assert kind == "RECOVERABLE", message
    ckpt = attempt0 / "checkpoint-4"
    assert sorted(p.name for p in attempt0.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in ckpt.glob(f"{COMPLETE_MARKER}.node*")) == [f"{COMPLETE_MARKER}.node0", f"{COMPLETE_MARKER}.node1"]
    shards = sorted(p.name for p in ckpt.glob("global_step4/*optim_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)], shards  # ZeRO-3: one per rank
    assert checkpoint_problem(ckpt) is None
    before = {p.relative_to(attempt0): p.stat().st_size for p in attempt0.rglob("*") if p.is_file()}

    # attempt 1: a new prefix; propeller hands it attempt 0's to read
    attempt1 = tmp_path / "attempt1-checkpoint"
    resumed_pods = _two_pods(task, inputs, tmp_path / "attempt1", attempt1, prev=str(attempt0))
    assert all(not (p / "out" / "error.pb").exists() for p in resumed_pods), _logs(resumed_pods)
    assert all("carried checkpoint-4" in (p / "log.txt").read_text() for p in resumed_pods), _logs(resumed_pods)
    resumed = _rank0(resumed_pods)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 8 and resumed["world_size"] == 2
    for step in range(5, 9):
        assert resumed["losses"][step] == pytest.approx(clean["losses"][step], rel=1e-4, abs=1e-5), step
    assert resumed["weights"].keys() == clean["weights"].keys()
    for name, w in clean["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], w, rtol=1e-4, atol=1e-6, msg=name)
    start = {}
    from safetensors.torch import load_file
    for f in sorted(model.glob("*.safetensors")):
        start.update(load_file(f))
    assert any(not torch.allclose(start[n], w) for n, w in clean["weights"].items() if n in start)  # they trained

    # attempt 1's prefix ends with at most keep_checkpoints, complete with both nodes' parts; attempt 0's untouched
    assert sorted(p.name for p in attempt1.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert checkpoint_problem(attempt1 / "checkpoint-8") is None
    assert {p.relative_to(attempt0): p.stat().st_size for p in attempt0.rglob("*") if p.is_file()} == before

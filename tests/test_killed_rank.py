"""A rank killed by a signal, or a launcher that fails its rendezvous, is retried (issue 24, item 4).

flytekit's Elastic task marks a failed launch RECOVERABLE only when the first failed rank left
the plugin's marker file, which a rank killed by a signal (the OOM killer's SIGKILL, the NCCL
watchdog's SIGABRT, a segfault) never writes; and the launcher's own rendezvous errors escape
that check. tasks/elastic.py ``RecoverableElasticTask`` classifies both as recoverable.

The end-to-end tests run ``train_elastic``'s real container command (``pyflyte-execute``, as
tests/test_retries.py does), kill rank 1 with a signal mid-training and read ``error.pb``.
"""

import datetime
import os
import signal
import socket
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_retries import ROOT, _error_kind, _execute, _weights

# --- classification, without a launch -----------------------------------------------------------


def _child_failed(failures: dict):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    return ChildFailedError("train_elastic", {
        rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file=str(error_file))
        for rank, (code, error_file) in failures.items()
    })


def test_a_signal_death_is_told_apart_from_a_python_error(tmp_path):
    from tasks.elastic import signal_failure_message

    killed = signal_failure_message(_child_failed({1: (-signal.SIGKILL, tmp_path / "none.json")}))
    assert "rank 1 (local rank 1, pid 1001) was killed by SIGKILL" in killed and "OOM killer" in killed
    assert "resumes from the last checkpoint" in killed
    aborted = signal_failure_message(_child_failed({0: (-signal.SIGABRT, tmp_path / "none.json")}))
    assert "rank 0" in aborted and "SIGABRT" in aborted and "NCCL watchdog" in aborted
    # a rank that exited with a Python exception (exit code 1) keeps flytekit's verdict
    assert signal_failure_message(_child_failed({1: (1, tmp_path / "none.json")})) is None
    assert signal_failure_message(ValueError("x")) is None


def test_launcher_faults_are_recoverable_and_python_errors_are_not(monkeypatch):
    from flytekit.exceptions.user import FlyteRecoverableException, FlyteUserRuntimeException
    from flytekitplugins.kfpytorch.task import PytorchElasticFunctionTask
    from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousTimeoutError

    from tasks.elastic import RecoverableElasticTask, is_launcher_fault
    from tasks.train import train_elastic

    assert isinstance(train_elastic, RecoverableElasticTask)
    assert all(is_launcher_fault(e) for e in (RendezvousTimeoutError("join"), RendezvousClosedError(),
                                               ConnectionResetError(104, "reset")))
    assert not any(is_launcher_fault(e) for e in (ValueError("bad"), KeyError("input_ids"), MemoryError()))

    def raising(error):
        def execute(self, **kwargs):
            raise error
        return execute

    monkeypatch.setattr(PytorchElasticFunctionTask, "execute", raising(RendezvousTimeoutError("timed out after 900s")))
    with pytest.raises(FlyteRecoverableException, match="launcher failed .*RendezvousTimeoutError: timed out"):
        train_elastic.execute()
    # a rank's Python error (flytekit: FlyteUserRuntimeException around the ChildFailedError) stays a user error
    python_error = FlyteUserRuntimeException(_child_failed({1: (1, "/nonexistent/error.json")}))
    monkeypatch.setattr(PytorchElasticFunctionTask, "execute", raising(python_error))
    with pytest.raises(FlyteUserRuntimeException):
        train_elastic.execute()
    killed = FlyteUserRuntimeException(_child_failed({1: (-signal.SIGKILL, "/nonexistent/error.json")}))
    monkeypatch.setattr(PytorchElasticFunctionTask, "execute", raising(killed))
    with pytest.raises(FlyteRecoverableException, match="rank 1 .* killed by SIGKILL"):
        train_elastic.execute()


def test_the_rendezvous_store_gets_the_read_timeout():
    """``read_timeout`` is the c10d rendezvous backend's key: its store then waits that long per read."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend

    from llm_finetune.config import TrainConfig
    from tasks.train import elastic_config

    cfg = elastic_config(TrainConfig()).rdzv_configs
    assert cfg["read_timeout"] >= 600 and cfg["timeout"] == cfg["join_timeout"] == 900
    params = RendezvousParameters(backend="c10d", endpoint="localhost:0", run_id="t", min_nodes=1, max_nodes=1,
                                  is_host=True, **cfg)
    _, store = create_backend(params)
    assert store.timeout == datetime.timedelta(seconds=cfg["read_timeout"])


# --- the final wait while rank 0 merges ---------------------------------------------------------


def _final_wait_worker(rank: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist

    from llm_finetune.training.distributed import wait_for_rank0

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))  # train.collective_timeout_s
    for name, wait in (("store-wait", lambda: wait_for_rank0("test/outputs_saved", 60)), ("barrier", dist.barrier)):
        try:
            if rank == 0:
                time.sleep(5)  # rank 0 merging the adapter, longer than the collective timeout
            wait()
            Path(result_dir, f"{name}-rank{rank}").write_text("ok")
        except Exception as e:
            Path(result_dir, f"{name}-rank{rank}").write_text(f"{type(e).__name__}: {e}")


@pytest.mark.slow
def test_the_other_ranks_outwait_a_merge_longer_than_the_collective_timeout(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_final_wait_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    assert (tmp_path / "store-wait-rank1").read_text() == "ok" == (tmp_path / "store-wait-rank0").read_text()
    # control: a barrier after the merge (the old final synchronisation) fails at the collective timeout
    assert (tmp_path / "barrier-rank1").read_text() != "ok"


# --- a rank killed mid-training, through the container command -----------------------------------

# First on the workers' PYTHONPATH: at TEST_KILL_AT_STEP rank 1 kills itself with TEST_KILL_SIGNAL
# (no Python exception, no error file: as the OOM killer or NCCL's watchdog would), while rank 0
# stalls in the step as an NCCL rank waiting for a dead peer does, until the launcher ends it.
KILL = textwrap.dedent('''
    import os
    if os.environ.get("TEST_KILL_AT_STEP"):
        import signal, time
        import llm_finetune.training.trainer as _trainer

        _step = _trainer.FineTuneTrainer.training_step

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step == int(os.environ["TEST_KILL_AT_STEP"]):
                if os.environ.get("RANK") == "1":
                    os.kill(os.getpid(), getattr(signal, os.environ["TEST_KILL_SIGNAL"]))
                elif os.environ.get("RANK") == "0":
                    time.sleep(300)
            return _step(self, model, inputs, num_items_in_batch)

        _trainer.FineTuneTrainer.training_step = training_step
''')


@pytest.fixture
def training_inputs(tmp_path, tokenizer):
    from flytekit.types.directory import FlyteDirectory
    from flytekit.types.structured import StructuredDataset

    from llm_finetune.config import DataConfig, TrainConfig, split_train
    from llm_finetune.data.prepare import prepare
    from tests.tiny import save_tiny_llama

    base = save_tiny_llama(tmp_path / "tiny", tokenizer)
    prepared = prepare(DataConfig(), tokenizer)
    train_cfg = TrainConfig(weights="full", max_steps=8, save_steps=4, eval_steps=0, per_device_batch_size=2,
                            learning_rate=3e-3, logging_steps=1, warmup_ratio=0.1, nproc_per_node=2, sample_prompts=0)
    train, ops = split_train(train_cfg)
    return {
        "base_model": FlyteDirectory(str(base)), "train_data": StructuredDataset(dataframe=prepared.train_tokens),
        "eval_data": StructuredDataset(dataframe=prepared.validation.head(4)), "data": DataConfig(), "train": train,
        "train_ops": ops,
    }


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGABRT"])
def test_a_rank_killed_by_a_signal_is_retried_and_the_retry_resumes(tmp_path, training_inputs, sig):
    from tasks.train import train_elastic

    (tmp_path / "kill").mkdir()
    (tmp_path / "kill" / "sitecustomize.py").write_text(KILL)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "kill"), str(ROOT)]), "TEST_KILL_AT_STEP": "6",
           "TEST_KILL_SIGNAL": sig}

    # attempt 0: rank 1 dies by the signal at step 7, after checkpoint-4 was stored
    _, log = _execute(train_elastic, training_inputs, tmp_path / "attempt0", env=env, timeout=300)
    assert (tmp_path / "attempt0" / "out" / "error.pb").exists(), log[-4000:]
    kind, message = _error_kind(tmp_path / "attempt0")
    assert kind == "RECOVERABLE", message  # propeller spends one of train.retries on it
    assert f"rank 1 (local rank 1, pid " in message and f"was killed by {sig}" in message, message
    assert ("OOM killer" if sig == "SIGKILL" else "NCCL watchdog") in message, message
    assert "the next attempt resumes from the last checkpoint" in message
    assert (tmp_path / "attempt0" / "checkpoint" / "checkpoint-4").is_dir()
    if sig == "SIGABRT":
        return  # the retry is the same as after SIGKILL: shown once

    # attempt 1: propeller hands it the failed attempt's checkpoint prefix; it resumes and finishes
    rc, log = _execute(train_elastic, training_inputs, tmp_path / "attempt1",
                       prev_checkpoint=str(tmp_path / "attempt0" / "checkpoint"), timeout=300)
    assert rc == 0 and not (tmp_path / "attempt1" / "out" / "error.pb").exists(), log[-4000:]
    assert "[train] resuming from checkpoint-4" in log, log[-4000:]
    resumed = _weights(tmp_path / "attempt1")
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 8

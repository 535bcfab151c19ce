"""A checkpoint upload slower than the collective timeout does not fail a 2-process run.

Rank 0 uploads on a background thread after every save while rank 1 trains on; with the
upload inside a barrier (as before), rank 1 would time out in it after
``collective_timeout_s``. The store is a LocalCheckpointStore that sleeps before each save.
"""

import json

import pytest

from llm_finetune.training.checkpoint import checkpoint_problem
from tests.tiny import run_torchrun, save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer)


@pytest.mark.slow
def test_slow_store_does_not_fail_a_two_process_run_and_every_checkpoint_arrives(tiny_dir, tmp_path):
    timeout_s, delay_s = 10, 15  # each upload takes longer than a collective may wait
    train = {"weights": "full", "max_steps": 6, "per_device_batch_size": 2, "save_steps": 3, "eval_steps": 0,
             "collective_timeout_s": timeout_s, "logging_steps": 1, "keep_checkpoints": 5}
    store = tmp_path / "store"
    spec = {"model_dir": str(tiny_dir), "out_dir": str(tmp_path / "out"), "train": train,
            "store": {"root": str(store), "delay_s": delay_s}}
    proc = run_torchrun(spec, tmp_path, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["steps"] == 6
    # only rank 0 uploaded, each checkpoint once, and the run returned only after the last one arrived
    assert log.count("[store] rank 0 uploaded") == 2 and "[store] rank 1" not in log
    assert log.index("[store] rank 0 uploaded checkpoint-6") < log.index("[summary]")
    assert sorted(p.name for p in store.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert all(checkpoint_problem(store / f"checkpoint-{s}") is None for s in (3, 6))  # complete, sizes match

"""One rank dying or hanging fails the whole 2-process run within a bounded time."""

import time

import pytest

from tests.tiny import run_torchrun, save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_run_fails_within_bound_when_a_rank_dies_or_hangs(mode, tiny_dir, tmp_path):
    timeout_s = 15
    train = {"weights": "full", "max_steps": 200, "per_device_batch_size": 2, "save_steps": 0, "eval_steps": 0,
             "collective_timeout_s": timeout_s, "logging_steps": 1}
    spec = {"model_dir": str(tiny_dir), "out_dir": str(tmp_path / "out"), "train": train,
            "fault": {"rank": 1, "step": 3, "mode": mode}}
    start = time.monotonic()
    proc = run_torchrun(spec, tmp_path, timeout=180)  # a hang hits this and fails the test
    elapsed = time.monotonic() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert f"rank 1 {mode}s at step 3" in log
    assert "[summary]" not in log and not (tmp_path / "out" / "train_summary.json").exists()
    # start-up (imports, tiny model) takes ~10-20 s here; the failure itself must not take much longer
    # than the collective timeout, and nowhere near the 200 steps the run asked for
    assert elapsed < 90, f"took {elapsed:.0f}s"
    if mode == "hang":
        assert "timeout" in log.lower() or "timed out" in log.lower(), log[-3000:]

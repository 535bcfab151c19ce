"""The Flyte checkpoint store against flytekit's real SyncCheckpoint on local paths (no mocks)."""

from flytekit.core.checkpointer import SyncCheckpoint

from llm_finetune.checkpoint import COMPLETE_MARKER, LocalCheckpointStore, latest_complete_checkpoint, relocate
from tasks.checkpoint import FlyteCheckpointStore


def _fake_checkpoints(root, steps, complete=()):
    for step in steps:
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "optimizer.pt").write_bytes(b"x" * step)
        (d / "trainer_state.json").write_text('{"best_model_checkpoint": "/old/attempt/checkpoints/checkpoint-%d"}' % steps[0])
        if step in complete:
            (d / COMPLETE_MARKER).write_text(str(step))
    return root


def test_a_retried_attempt_restores_what_the_previous_attempt_saved(tmp_path):
    src = _fake_checkpoints(tmp_path / "attempt1" / "checkpoints", [4, 8], complete=(4, 8))
    FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "remote-1"))).save(src)

    first = FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "remote-x")))
    assert first.restore(tmp_path / "nothing") is None  # first attempt: no previous checkpoint

    retry = FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "remote-2"), checkpoint_src=str(tmp_path / "remote-1")))
    dest = tmp_path / "attempt2" / "checkpoints"
    dest.mkdir(parents=True)
    assert retry.restore(dest) == dest
    assert latest_complete_checkpoint(dest) == dest / "checkpoint-8"
    assert (dest / "checkpoint-8" / "optimizer.pt").read_bytes() == b"x" * 8
    relocate(dest)  # the best checkpoint now points into this attempt's directory
    assert str(dest / "checkpoint-4") in (dest / "checkpoint-8" / "trainer_state.json").read_text()


def test_a_checkpoint_without_its_completion_marker_is_skipped(tmp_path):
    root = _fake_checkpoints(tmp_path / "c", [4, 8, 12], complete=(4, 8))  # 12 was cut short
    assert latest_complete_checkpoint(root) == root / "checkpoint-8"
    store = LocalCheckpointStore(tmp_path / "store")
    assert store.restore(tmp_path / "r") is None
    store.save(root)
    store.save(root)  # replaces, does not accumulate
    assert sorted(p.name for p in store.current.iterdir()) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]

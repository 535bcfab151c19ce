"""Checkpoint stores: the Flyte one against flytekit's real SyncCheckpoint on local paths (no mocks).

Checkpoints are marked complete with the production ``write_node_marker`` (what each node's
local rank 0 does after a save); incomplete, truncated and half-uploaded ones are built
by hand, as a preemption or a dead node would leave them.
"""

import json
import logging
import threading

import pytest
from flytekit.core.checkpointer import SyncCheckpoint

from llm_finetune.training.checkpoint import (
    COMPLETE_MARKER, LocalCheckpointStore, latest_complete_checkpoint, node_part, relocate, write_node_marker,
)
from llm_finetune.training.checkpoint_upload import BackgroundUploader, CheckpointUploadError
from tasks.checkpoint import FlyteCheckpointStore


def _checkpoint(root, step, complete=True, nodes=((0, 1),), best=None):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "optimizer.pt").write_bytes(b"x" * step)
    best_path = f"/old/attempt/checkpoints/checkpoint-{best}" if best else None
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "best_model_checkpoint": best_path}))
    if complete:
        for node, nnodes in nodes:
            write_node_marker(d, node, nnodes)
    return d


def test_a_retried_attempt_restores_what_the_previous_attempt_saved(tmp_path):
    src = tmp_path / "attempt1" / "checkpoints"
    attempt1 = FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "remote-1")))
    for step in (4, 8):
        attempt1.save(_checkpoint(src, step, best=4))

    first = FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "remote-x")))
    assert first.restore(tmp_path / "nothing") is None  # first attempt: no previous checkpoint
    never_saved = FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "r"), checkpoint_src=str(tmp_path / "gone")))
    assert never_saved.restore(tmp_path / "nothing") is None  # the previous attempt died before its first save

    retry = FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "remote-2"), checkpoint_src=str(tmp_path / "remote-1")))
    dest = tmp_path / "attempt2" / "checkpoints"
    dest.mkdir(parents=True)
    assert retry.restore(dest) == dest
    assert latest_complete_checkpoint(dest) == dest / "checkpoint-8"
    assert (dest / "checkpoint-8" / "optimizer.pt").read_bytes() == b"x" * 8
    relocate(dest)  # the best checkpoint now points into this attempt's directory ...
    assert str(dest / "checkpoint-4") in (dest / "checkpoint-8" / "trainer_state.json").read_text()
    assert latest_complete_checkpoint(dest) == dest / "checkpoint-8"  # ... and the manifest still matches


def test_an_attempt_carries_the_previous_newest_and_best_checkpoint_into_its_own_prefix(tmp_path, capsys):
    """Attempt 1 saves 2, 4, 6 (best: 4) and a half-uploaded 8; attempt 2 carries 6 and 4 and dies;
    attempt 3, given only attempt 2's prefix, still restores checkpoint-6 and its best."""
    local = tmp_path / "attempt1" / "checkpoints"
    attempt1 = FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "remote-1")))
    for step in (2, 4, 6):
        attempt1.save(_checkpoint(local, step, best=4 if step >= 4 else None))
    attempt1.save(_checkpoint(local, 8, complete=False))  # preempted mid-upload: no manifest

    attempt2 = FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "remote-2"),
                                                   checkpoint_src=str(tmp_path / "remote-1")))
    assert attempt2.carry_forward() == ["checkpoint-6", "checkpoint-4"]
    assert "carried checkpoint-6, checkpoint-4 from the previous attempt" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "remote-2").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert attempt2.contains_complete("checkpoint-6") and attempt2.contains_complete("checkpoint-4")
    assert not list((tmp_path / "remote-2").rglob("*.part"))
    # a second carrier (another node of the same attempt) finds everything in place and copies nothing
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "remote-2").rglob("*") if p.is_file()}
    assert attempt2.carry_forward() == ["checkpoint-6", "checkpoint-4"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "remote-2").rglob("*") if p.is_file()} == before

    # attempt 2 dies in start-up, before any save; attempt 3 reads attempt 2's prefix
    attempt3 = FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "remote-3"),
                                                   checkpoint_src=str(tmp_path / "remote-2")))
    dest = tmp_path / "attempt3" / "checkpoints"
    dest.mkdir(parents=True)
    assert attempt3.restore(dest) == dest
    assert latest_complete_checkpoint(dest) == dest / "checkpoint-6"
    assert (dest / "checkpoint-6" / "optimizer.pt").read_bytes() == b"x" * 6
    assert (dest / "checkpoint-4").is_dir()  # the best checkpoint travelled with it

    # nothing to carry: a first attempt, and a previous attempt that never completed a checkpoint
    assert FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "r"))).carry_forward() == []
    (tmp_path / "remote-0").mkdir()
    _checkpoint(tmp_path / "remote-0", 2, complete=False)
    empty = FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "r4"), checkpoint_src=str(tmp_path / "remote-0")))
    assert empty.carry_forward() == [] and not (tmp_path / "r4").exists()


@pytest.mark.parametrize("damage", ["no manifest", "truncated", "missing file", "one node missing"])
def test_a_partial_or_corrupt_newest_checkpoint_is_skipped_with_a_warning(damage, tmp_path, caplog):
    root = tmp_path / "c"
    _checkpoint(root, 4)
    nodes = ((0, 2),) if damage == "one node missing" else ((0, 1),)
    newest = _checkpoint(root, 8, complete=damage != "no manifest", nodes=nodes)
    if damage == "truncated":
        (newest / "optimizer.pt").write_bytes(b"x" * 3)
    elif damage == "missing file":
        (newest / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="llm_finetune.training.checkpoint"):
        assert latest_complete_checkpoint(root) == root / "checkpoint-4"
    expected = {"no manifest": "no completion manifest", "truncated": "optimizer.pt has 3 bytes",
                "missing file": "trainer_state.json (listed by node 0) is missing",
                "one node missing": "node(s) [1] of 2 never finished"}[damage]
    assert any("skipping checkpoint-8" in r.message and expected in r.message for r in caplog.records), caplog.text


def test_checkpoints_of_two_nodes_complete_one_checkpoint(tmp_path):
    """Each node uploads its own ranks' shards into the same checkpoint; complete only with both manifests.

    Both nodes write a trainer state, not byte-identical (each logs its own throughput):
    only node 0's is stored, so the two manifests never disagree about it.
    """
    store = LocalCheckpointStore(tmp_path / "store")
    for node in (0, 1):
        d = tmp_path / f"node{node}" / "checkpoint-6"
        (d / "global_step6").mkdir(parents=True)
        (d / "trainer_state.json").write_text('{"tokens_per_s": %d}' % (100 + 7 * node))
        (d / "global_step6" / "mp_rank_00_model_states.pt").write_bytes(b"m" * (20 + node))
        (d / "global_step6" / f"zero_pp_rank_{node}_mp_rank_00_optim_states.pt").write_bytes(b"s" * (10 + node))
        (d / f"rng_state_{node}.pth").write_bytes(b"r")
        part = node_part(d, node, range(node, node + 1))
        if node == 1:
            assert part == ["global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_1.pth"]
        write_node_marker(d, node, 2, part)
        up = BackgroundUploader(store, tmp_path / f"staging{node}", keep=2, prune=node == 0)
        up.submit(d, part)
        up.close(wait_for_nodes=False)
        assert store.contains_complete("checkpoint-6") is (node == 1)  # node 0's part alone is not enough
    restored = tmp_path / "restored"
    store.restore(restored)
    assert latest_complete_checkpoint(restored) == restored / "checkpoint-6"
    shards = sorted(p.name for p in (restored / "checkpoint-6" / "global_step6").glob("zero_*"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (restored / "checkpoint-6" / "trainer_state.json").read_text() == '{"tokens_per_s": 100}'


def test_fsdp2_distcp_shards_are_per_rank_files(tmp_path):
    """FSDP2's sharded checkpoint (torch.distributed.checkpoint): node 1 of 2 (ranks 2, 3) contributes its ranks'
    ``__<rank>_0.distcp`` files and RNG states; ``.metadata`` (rank 0's, copied to every node) comes from node 0."""
    d = tmp_path / "checkpoint-4"
    for sub in ("pytorch_model_fsdp_0", "optimizer_0"):
        (d / sub).mkdir(parents=True)
        (d / sub / ".metadata").write_bytes(b"m")
        for r in range(4):
            (d / sub / f"__{r}_0.distcp").write_bytes(b"s" * (r + 1))
    for r in range(4):
        (d / f"rng_state_{r}.pth").write_bytes(b"r")
    (d / "scheduler.pt").write_bytes(b"x")
    assert node_part(d, 1, range(2, 4)) == [
        "optimizer_0/__2_0.distcp", "optimizer_0/__3_0.distcp", "pytorch_model_fsdp_0/__2_0.distcp",
        "pytorch_model_fsdp_0/__3_0.distcp", "rng_state_2.pth", "rng_state_3.pth",
    ]
    assert len(node_part(d, 0, range(0, 2))) == 2 * 5 + 4 + 1  # node 0: everything, .metadata included


@pytest.mark.parametrize("kind", ["local", "flyte"])
def test_prune_keeps_the_newest_complete_checkpoints_and_the_best(kind, tmp_path):
    if kind == "local":
        store = LocalCheckpointStore(tmp_path / "store")
        stored = lambda: sorted(p.name for p in store.root.iterdir())  # noqa: E731
    else:
        store = FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "remote")))
        stored = lambda: sorted(p.name for p in (tmp_path / "remote").iterdir())  # noqa: E731
    src = tmp_path / "local"
    for step in (2, 4, 6, 8):
        store.save(_checkpoint(src, step, best=4 if step >= 4 else None))
    assert store.prune(2) == ["checkpoint-2"]  # 4 stays: the newest (8) names it as the best
    assert stored() == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    store.save(_checkpoint(src, 10, complete=False))  # another node still uploading: not complete yet
    store.prune(1)
    assert stored() == ["checkpoint-10", "checkpoint-4", "checkpoint-8"]  # newer incomplete one is kept


class SlowStore(LocalCheckpointStore):
    """A store whose uploads take ``delay`` seconds; records the thread each ran on."""

    def __init__(self, root, delay, fail=False):
        super().__init__(root)
        self.delay, self.fail, self.threads = delay, fail, []

    def save(self, ckpt_dir):
        self.threads.append(threading.current_thread().name)
        threading.Event().wait(self.delay)
        if self.fail:
            raise ConnectionError("object store unreachable")
        super().save(ckpt_dir)


def test_background_uploads_run_in_order_off_the_training_thread(tmp_path):
    store = SlowStore(tmp_path / "store", delay=0.3)
    up = BackgroundUploader(store, tmp_path / "staging", keep=2)
    src = tmp_path / "local"
    for step in (2, 4, 6):
        up.submit(_checkpoint(src, step))
    # the Trainer deletes old checkpoints while they upload: the snapshot keeps their files
    import shutil

    shutil.rmtree(src / "checkpoint-2")
    up.close()
    assert up.uploaded == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert set(store.threads) == {"checkpoint-upload"}
    assert sorted(p.name for p in store.root.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert not (tmp_path / "staging").exists()


def test_an_upload_failure_is_raised_in_the_training_thread(tmp_path):
    up = BackgroundUploader(SlowStore(tmp_path / "store", delay=0.0, fail=True), tmp_path / "staging", keep=2)
    up.submit(_checkpoint(tmp_path / "local", 2))
    with pytest.raises(CheckpointUploadError, match="ConnectionError: object store unreachable") as e:
        up.close()
    assert isinstance(e.value.__cause__, ConnectionError)


def test_flyte_store_uploads_from_the_background_thread(tmp_path):
    store = FlyteCheckpointStore(SyncCheckpoint(checkpoint_dest=str(tmp_path / "remote")))
    up = BackgroundUploader(store, tmp_path / "staging", keep=1)
    for step in (3, 6):
        up.submit(_checkpoint(tmp_path / "local", step))
    up.close()
    assert sorted(p.name for p in (tmp_path / "remote").iterdir()) == ["checkpoint-6"]
    assert (tmp_path / "remote" / "checkpoint-6" / f"{COMPLETE_MARKER}.node0").is_file()

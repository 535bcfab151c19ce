"""Checkpoint uploads on a background thread, outside every collective.

Uploading a large checkpoint takes longer than ``train.collective_timeout_s`` (an 8B full
checkpoint: more than 10 minutes), so it must not happen while other ranks wait in a
barrier or an all-reduce. On each save, a node's local rank 0 snapshots the checkpoint
(hard links: instant, and safe from the Trainer deleting it while it uploads) and queues
it; one thread uploads the snapshots in order, each after the previous one, and prunes the
store to the newest ``keep`` complete checkpoints. Training goes on meanwhile on every rank.

``close`` waits for the queue to drain and re-raises an upload failure, so a run never
reports success with its last checkpoint missing. ``train`` calls it after its last
collective, and also when training fails, so a checkpoint saved just before a failure
still reaches the store.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class CheckpointUploadError(RuntimeError):
    """Uploading a checkpoint to the store failed; ``__cause__`` is the store's own error."""


def link_or_copy(src, dst):
    """Hard links make a snapshot free; copy where linking is not possible (another filesystem)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class BackgroundUploader:
    """Uploads checkpoint snapshots to ``store`` in order on one thread.

    ``prune``: whether this process also deletes old checkpoints from the store (node 0
    only, so nodes never race on deletes). ``nnodes > 1``: ``close`` waits up to
    ``wait_for_nodes_s`` for the other nodes' parts of the last checkpoint before the final
    prune, so the store ends with at most ``keep`` checkpoints.
    """

    def __init__(self, store, staging_dir: Path, keep: int, prune: bool = True, nnodes: int = 1,
                 wait_for_nodes_s: float = 1800.0):
        self.store, self.staging_dir, self.keep, self.prune = store, Path(staging_dir), keep, prune
        self.nnodes, self.wait_for_nodes_s = nnodes, wait_for_nodes_s
        self.uploaded: list[str] = []  # checkpoint names, in upload order
        self.upload_seconds: list[float] = []
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._n = 0

    def submit(self, ckpt_dir: Path, files: list[str] | None = None) -> None:
        """Snapshot ``ckpt_dir`` (only ``files`` and the manifests, if given) now and queue its upload; returns at once."""
        self.raise_if_failed()
        self._n += 1
        snap = self.staging_dir / f"{self._n:06d}" / Path(ckpt_dir).name
        if files is None:
            shutil.copytree(ckpt_dir, snap, copy_function=link_or_copy)
        else:
            from llm_finetune.training.checkpoint import COMPLETE_MARKER

            for rel in [*files, *(p.name for p in Path(ckpt_dir).glob(f"{COMPLETE_MARKER}.node*"))]:
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(Path(ckpt_dir) / rel, snap / rel)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
            self._thread.start()
        self._queue.put(snap)
        backlog = self._queue.qsize()
        if backlog > 2:
            logger.warning("%d checkpoints wait for upload: the store is slower than train.save_steps; "
                           "save less often or expect a retry to resume further back", backlog)

    def _run(self) -> None:
        while True:
            snap = self._queue.get()
            if snap is None:
                return
            try:
                if self._error is None:  # after a failure, later uploads are dropped and close() raises
                    start = time.perf_counter()
                    self.store.save(snap)
                    if self.prune:
                        self.store.prune(self.keep)
                    self.upload_seconds.append(time.perf_counter() - start)
                    self.uploaded.append(snap.name)
                    logger.info("uploaded %s in %.1fs", snap.name, self.upload_seconds[-1])
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by close()
                self._error = e
            finally:
                shutil.rmtree(snap.parent, ignore_errors=True)

    def raise_if_failed(self) -> None:
        if self._error is not None:
            e = self._error
            raise CheckpointUploadError(f"checkpoint upload to {type(self.store).__name__} failed: "
                                        f"{type(e).__name__}: {e}") from e

    def close(self, wait_for_nodes: bool = True) -> None:
        """Wait for every queued upload (and, on node 0 of several, the other nodes' parts); then prune.

        ``wait_for_nodes`` False (a failed run): the other nodes may be dead, do not wait for them.
        """
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        self.raise_if_failed()
        if self.prune and self.uploaded and self.nnodes > 1 and wait_for_nodes:
            last, deadline = self.uploaded[-1], time.monotonic() + self.wait_for_nodes_s
            while not self.store.contains_complete(last):
                if time.monotonic() > deadline:
                    logger.warning("%s is still incomplete in the store after %.0fs (another node's upload); "
                                   "not pruning, the store may hold one checkpoint more than train.keep_checkpoints",
                                   last, self.wait_for_nodes_s)
                    return
                time.sleep(1.0)
            self.store.prune(self.keep)

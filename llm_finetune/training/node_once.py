"""Work done once per node (downloads of the base model, the data, the checkpoints) that every local process reads.

torchrun starts one process per GPU; each used to download the base model and the data
itself, N times the traffic and disk for nothing. Here the first process on the node to
take an exclusive file lock does the work into a staging directory and renames it into
place; the others block on the lock (a file lock, not a collective: a slow download cannot
trip ``train.collective_timeout_s``, and it works before the process group exists) and then
read the result. A process that fails mid-fetch leaves only its staging directory behind,
so the next one to take the lock fetches again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

DONE = ".done"


def node_cache_root() -> Path:
    """Where per-node downloads go: ``$LLM_FINETUNE_NODE_CACHE``, else the system temp dir (the pod's disk)."""
    return Path(os.environ.get("LLM_FINETUNE_NODE_CACHE") or Path(tempfile.gettempdir()) / "llm-finetune-node")


def run_once_per_node(done_marker: Path, work: Callable[[], None]) -> bool:
    """Run ``work`` unless ``done_marker`` exists, holding the node's lock; True if this process ran it."""
    done_marker = Path(done_marker)
    done_marker.parent.mkdir(parents=True, exist_ok=True)
    with open(done_marker.with_name(done_marker.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        if done_marker.exists():
            return False
        work()
        done_marker.write_text(str(os.getpid()))
        return True


def fetch_once_per_node(key: str, fetch: Callable[[Path], None], root: Path | None = None) -> Path:
    """A node-local directory holding what ``fetch(dir)`` writes for ``key`` (e.g. a remote URI).

    The directory is named by a hash of ``key``; the first process fetches into a staging
    directory that is renamed into place, later ones (on this node) just get the path.
    """
    root = Path(root) if root is not None else node_cache_root()
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    dest = root / name

    def work() -> None:
        shutil.rmtree(dest, ignore_errors=True)  # a half-written one from a process that died
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            fetch(staging)
            staging.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    run_once_per_node(root / f"{name}{DONE}", work)
    return dest

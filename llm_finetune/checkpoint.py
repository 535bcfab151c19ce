"""Checkpoint stores: where training checkpoints survive the process that wrote them.

The core stays Flyte-free: ``train`` takes any object with ``save(src_dir)`` and
``restore(dest_dir) -> Path | None`` (the shape of ``flytekit.current_context().checkpoint``).
``LocalCheckpointStore`` keeps them in a directory (tests, runs outside Flyte);
``tasks/train.py`` wraps Flyte's intra-task checkpoint, which a retried attempt (spot
preemption, a recoverable error) reads back.

What is stored is the HF Trainer's ``checkpoints/`` directory (the latest checkpoint and
the best one by validation loss): model or adapter weights, optimizer, scheduler, RNG
states and ``trainer_state.json`` (global step, hence the data position), i.e. what
``Trainer.train(resume_from_checkpoint=...)`` restores.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"  # written after every rank finished writing its part
_STEP = re.compile(r"^checkpoint-(\d+)$")


class CheckpointStore(Protocol):
    def save(self, src_dir: Path) -> None: ...

    def restore(self, dest_dir: Path) -> Path | None: ...


class LocalCheckpointStore:
    """Keeps the latest saved directory under ``root``; a save replaces it atomically.

    Atomic (copy, then rename) so a process killed mid-save leaves the previous checkpoint
    intact rather than half of a new one.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.saves = 0

    @property
    def current(self) -> Path:
        return self.root / "current"

    def save(self, src_dir: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        shutil.copytree(src_dir, staging, dirs_exist_ok=True)
        old = self.root / ".old"
        if self.current.exists():
            shutil.rmtree(old, ignore_errors=True)
            self.current.rename(old)
        staging.rename(self.current)
        shutil.rmtree(old, ignore_errors=True)
        self.saves += 1

    def restore(self, dest_dir: Path) -> Path | None:
        if not self.current.is_dir():
            return None
        shutil.copytree(self.current, dest_dir, dirs_exist_ok=True)
        return Path(dest_dir)


def checkpoint_step(path: Path) -> int:
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else -1


def latest_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` whose marker says all ranks finished writing it."""
    if not checkpoints_dir.is_dir():
        return None
    done = [p for p in checkpoints_dir.iterdir() if checkpoint_step(p) >= 0 and (p / COMPLETE_MARKER).is_file()]
    return max(done, key=checkpoint_step, default=None)


def relocate(checkpoints_dir: Path) -> None:
    """Point ``best_model_checkpoint`` in restored trainer states at this attempt's directory.

    The Trainer records it as an absolute path, and a retry runs in a fresh directory
    (often on another machine), so without this the best checkpoint would be lost.
    """
    for state_file in checkpoints_dir.glob("checkpoint-*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        best = state.get("best_model_checkpoint")
        if best:
            state["best_model_checkpoint"] = str(checkpoints_dir / Path(best).name)
            state_file.write_text(json.dumps(state, indent=2))

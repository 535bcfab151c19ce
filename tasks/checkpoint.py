"""Flyte's intra-task checkpoint as a checkpoint store for the Flyte-free training core.

A retried attempt of the train task (spot preemption, a recoverable error) restores what
the previous attempt saved and the core resumes from it. Each checkpoint's completion
marker is uploaded only after its files, so an upload cut short by a preemption leaves a
checkpoint that the next attempt skips rather than one it loads half of.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import flytekit
from flytekit.core.context_manager import FlyteContextManager

from llm_finetune.checkpoint import COMPLETE_MARKER


def _link_or_copy(src, dst):
    """Hard links make the staging copy free; copy where linking is not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class FlyteCheckpointStore:
    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    @classmethod
    def current(cls) -> "FlyteCheckpointStore | None":
        """The running task's checkpoint, or None where the platform offers none."""
        try:
            return cls(flytekit.current_context().checkpoint)
        except (NotImplementedError, AttributeError):
            return None

    def save(self, src_dir: Path) -> None:
        staging = Path(tempfile.mkdtemp(prefix="ckpt-upload-"))
        try:
            files = shutil.copytree(
                src_dir, staging / "c", copy_function=_link_or_copy, ignore=shutil.ignore_patterns(COMPLETE_MARKER)
            )
            self.checkpoint.save(files)
            fa = FlyteContextManager.current_context().file_access
            dest = str(self.checkpoint._checkpoint_dest).rstrip("/")
            for marker in Path(src_dir).glob(f"*/{COMPLETE_MARKER}"):
                fa.put_data(str(marker), f"{dest}/{marker.parent.name}/{COMPLETE_MARKER}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def restore(self, dest_dir: Path) -> Path | None:
        try:
            return self.checkpoint.restore(dest_dir)
        except Exception as e:  # an attempt that failed before its first save leaves nothing to fetch
            print(f"[train] no checkpoint restored ({type(e).__name__}: {e}); starting from step 0", flush=True)
            return None

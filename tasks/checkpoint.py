"""Flyte's intra-task checkpoint as a checkpoint store for the Flyte-free training core.

Flyte gives each attempt of a task one checkpoint prefix to write (``checkpoint_dest``) and
the previous attempt's prefix to read (``checkpoint_src``). The layout under the prefix is
the core's (llm_finetune/checkpoint.py): ``checkpoint-<step>/`` with every node's files and
its completion manifest, which is uploaded after them, so a checkpoint cut short by a
preemption is skipped rather than half-loaded. All nodes of a multi-node run write into the
same prefix (their shard files have distinct names); node 0 alone deletes old checkpoints.

A retry restores the previous attempt's prefix, and the core re-uploads the checkpoint it
resumes from into the new prefix, so an attempt that dies before its first save does not
lose the checkpoints of the attempts before it.

The file access object is captured when the store is created: uploads run on a background
thread, which does not see the task's Flyte context (a ``ContextVar``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import flytekit
from flytekit.core.context_manager import FlyteContextManager

from llm_finetune.checkpoint import PrefixCheckpointStore, checkpoint_step
from llm_finetune.checkpoint_upload import link_or_copy


class FlyteCheckpointStore(PrefixCheckpointStore):
    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.file_access = FlyteContextManager.current_context().file_access
        self.dest = str(checkpoint._checkpoint_dest).rstrip("/")
        self.src = checkpoint._checkpoint_src

    @classmethod
    def current(cls) -> "FlyteCheckpointStore | None":
        """The running task's checkpoint, or None where the platform offers none."""
        try:
            return cls(flytekit.current_context().checkpoint)
        except (NotImplementedError, AttributeError):
            return None

    def _fs(self, path: str):
        return self.file_access.get_filesystem_for_path(path)

    def _listing(self) -> dict[str, dict[str, int]]:
        fs = self._fs(self.dest)
        if not fs.exists(self.dest):
            return {}
        root = fs._strip_protocol(self.dest).rstrip("/")
        out: dict[str, dict[str, int]] = {}
        for path, info in fs.find(self.dest, detail=True).items():
            name, _, rel = fs._strip_protocol(path)[len(root) + 1 :].partition("/")
            if checkpoint_step(name) >= 0 and rel:
                out.setdefault(name, {})[rel] = int(info["size"])
        return out

    def _read(self, name: str, rel: str) -> bytes:
        return self._fs(self.dest).cat_file(f"{self.dest}/{name}/{rel}")

    def _put_files(self, ckpt_dir: Path, rels: list[str]) -> None:
        if not rels:
            return
        staging = Path(tempfile.mkdtemp(prefix="ckpt-upload-"))
        try:
            for rel in rels:  # hard links: the staging tree costs nothing
                target = staging / Path(ckpt_dir).name / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(Path(ckpt_dir) / rel, target)
            self.file_access.upload_directory(str(staging), self.dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _delete(self, name: str) -> None:
        self._fs(self.dest).rm(f"{self.dest}/{name}", recursive=True)

    def restore(self, dest_dir: Path) -> Path | None:
        """Download the previous attempt's prefix; None on a first attempt or when it saved nothing."""
        if not self.src:
            return None
        if not self._fs(self.src).exists(self.src):  # the previous attempt failed before its first save
            print(f"[train] the previous attempt left no checkpoints at {self.src}; starting from step 0", flush=True)
            return None
        self.file_access.download_directory(self.src, str(dest_dir))
        return Path(dest_dir)

"""Flyte's intra-task checkpoint as a checkpoint store for the Flyte-free training core.

Flyte gives each attempt of a task one checkpoint prefix to write (``checkpoint_dest``) and
the previous attempt's prefix to read (``checkpoint_src``). The layout under the prefix is
the core's (llm_finetune/training/checkpoint.py): ``checkpoint-<step>/`` with every node's files and
its completion manifest, which is uploaded after them, so a checkpoint cut short by a
preemption is skipped rather than half-loaded. All nodes of a multi-node run write into the
same prefix (their shard files have distinct names); node 0 alone deletes old checkpoints.

A retry restores the previous attempt's prefix. Before that, as the first thing an attempt
does (in the launcher, before the workers start, the rendezvous waits or the model
downloads), ``carry_forward`` copies the previous attempt's newest complete checkpoint into
this attempt's own prefix (tasks/elastic.py). An attempt preempted in start-up then still
hands the next attempt that checkpoint: the chain of attempts never falls back to step 0.

The file access object is captured when the store is created: uploads run on a background
thread, which does not see the task's Flyte context (a ``ContextVar``).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from pathlib import Path

import flytekit
from flytekit.core.context_manager import FlyteContextManager

from llm_finetune.training.checkpoint import PrefixCheckpointStore, checkpoint_step
from llm_finetune.training.checkpoint_upload import link_or_copy


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

    def _copy_in(self, previous: "FlyteCheckpointStore", name: str, rels: list[str]) -> None:
        """Store-side copies (an object store copies without the bytes passing through the pod)."""
        fs = self._fs(self.dest)
        same_fs = type(previous._fs(previous.dest)) is type(fs)
        local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
        for rel in rels:
            src, dst = f"{previous.dest}/{name}/{rel}", f"{self.dest}/{name}/{rel}"
            if not same_fs:  # two kinds of store: through this pod's disk
                with tempfile.TemporaryDirectory(prefix="ckpt-carry-") as tmp:
                    self.file_access.get_data(src, f"{tmp}/f")
                    self.file_access.put_data(f"{tmp}/f", dst)
            elif local:  # a local file appears whole (other nodes carry the same files at the same time)
                fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
                part = f"{dst}.{os.getpid()}.part"
                fs.copy(src, part)
                os.replace(fs._strip_protocol(part), fs._strip_protocol(dst))
            else:  # an object appears whole on its own
                fs.copy(src, dst)

    def previous(self) -> "FlyteCheckpointStore | None":
        """The previous attempt's prefix as a store to read (None on a first attempt)."""
        if not self.src:
            return None
        view = copy.copy(self)
        view.dest, view.src = str(self.src).rstrip("/"), None
        return view

    def carry_forward(self) -> list[str]:
        """Copy the previous attempt's newest complete checkpoint (and its best) into this attempt's prefix.

        A failure to carry is reported and ignored: restore still reads the previous prefix
        directly, so the carry only protects the attempt after this one.
        """
        previous = self.previous()
        if previous is None:
            return []
        start = time.perf_counter()
        try:
            names = self.carry_from(previous)
        except Exception as e:  # noqa: BLE001 - the carry is a safety net, not a step training needs
            print(f"[train] could not carry the previous attempt's checkpoint from {previous.dest} into {self.dest} "
                  f"({type(e).__name__}: {e}); this attempt still resumes from it", flush=True)
            return []
        if names:
            print(f"[train] carried {', '.join(names)} from the previous attempt's checkpoint prefix {previous.dest} into "
                  f"this attempt's {self.dest} in {time.perf_counter() - start:.1f}s, before loading anything: "
                  f"a retry after this attempt resumes from it even if this attempt dies in start-up", flush=True)
        else:
            print(f"[train] the previous attempt left no complete checkpoint at {previous.dest}", flush=True)
        return names

    def restore(self, dest_dir: Path) -> Path | None:
        """Download the previous attempt's prefix; None on a first attempt or when it saved nothing."""
        if not self.src:
            return None
        if not self._fs(self.src).exists(self.src):  # the previous attempt failed before its first save
            print(f"[train] the previous attempt left no checkpoints at {self.src}; starting from step 0", flush=True)
            return None
        self.file_access.download_directory(self.src, str(dest_dir))
        return Path(dest_dir)

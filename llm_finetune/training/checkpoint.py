"""Checkpoint stores: where training checkpoints survive the processes and nodes that wrote them.

The core stays Flyte-free: ``train`` takes any ``CheckpointStore`` (``save`` one checkpoint,
``restore`` all of them, ``prune`` old ones). ``LocalCheckpointStore`` keeps them in a
directory (tests, runs outside Flyte); ``tasks/checkpoint.py`` maps the same layout onto
Flyte's intra-task checkpoint prefix, which a retried attempt reads back.

Layout (the store and every node's local ``checkpoints/`` alike)::

    checkpoint-<step>/...                        what the HF Trainer (and DeepSpeed) wrote
    checkpoint-<step>/CHECKPOINT_COMPLETE.node<k>  node k's manifest, uploaded after its files

Every node saves a full checkpoint on its own disk (multi-node runs save on each node;
DeepSpeed writes each rank's ZeRO shards, FSDP2 each rank's ``__<rank>_0.distcp``), and each node's local rank 0 uploads its
directory into the same ``checkpoint-<step>`` of the store, files first and its manifest
last. A checkpoint is complete when the manifests of all ``nnodes`` nodes are there and
every file they list has the size they record: an upload cut short (preemption, a dead
node) or a truncated file leaves a checkpoint that restore skips with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Protocol

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"  # prefix of the per-node manifests: CHECKPOINT_COMPLETE.node<k>
_STEP = re.compile(r"^checkpoint-(\d+)$")
_MARKER = re.compile(r"^" + COMPLETE_MARKER + r"\.node(\d+)$")
# per-rank files: DeepSpeed ZeRO shards ([bf16_]zero_pp_rank_<r>_mp_rank_..), the Trainer's rng_state_<r>.pth and
# FSDP2's torch.distributed.checkpoint shards (pytorch_model_fsdp_0/__<r>_0.distcp, optimizer_0/__<r>_0.distcp)
_RANK_FILE = re.compile(r"(?:^|/)[^/]*zero_pp_rank_(\d+)_[^/]*$|(?:^|/)rng_state_(\d+)\.pth$|(?:^|/)__(\d+)_\d+\.distcp$")


class CheckpointStore(Protocol):
    def save(self, ckpt_dir: Path) -> None:
        """Upload one ``checkpoint-<step>`` directory: its files, then its completion manifests."""

    def restore(self, dest_dir: Path) -> Path | None:
        """Download every stored checkpoint into ``dest_dir``; None when there is nothing to restore."""

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` complete checkpoints (and the best one they name)."""

    def contains_complete(self, name: str) -> bool:
        """Whether checkpoint ``name`` is stored with every node's part."""


def checkpoint_step(path: Path | str) -> int:
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else -1


def marker_name(node: int) -> str:
    return f"{COMPLETE_MARKER}.node{node}"


def is_marker(name: str) -> bool:
    return name.startswith(COMPLETE_MARKER)


def local_files(ckpt_dir: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``ckpt_dir``."""
    return {p.relative_to(ckpt_dir).as_posix(): p.stat().st_size for p in sorted(Path(ckpt_dir).rglob("*")) if p.is_file()}


def node_part(ckpt_dir: Path, node: int, ranks: range | list[int]) -> list[str]:
    """The files node ``node`` contributes to a checkpoint: all of them on node 0, its ranks' shards elsewhere.

    Every node writes the shared files too (trainer state, scheduler, weights), but not
    byte-identically (the trainer state logs each node's own throughput), so only node 0's
    copy is stored; other nodes add their ranks' ZeRO or FSDP2 shards and RNG states.
    """
    files = [rel for rel in local_files(ckpt_dir) if not is_marker(Path(rel).name)]
    if node == 0:
        return files
    own = []
    for rel in files:
        m = _RANK_FILE.search(rel)
        if m and int(next(g for g in m.groups() if g is not None)) in ranks:
            own.append(rel)
    return own


def write_node_marker(ckpt_dir: Path, node: int, nnodes: int, part: list[str] | None = None) -> Path:
    """Record what this node contributes (file sizes): written once all of its ranks have finished writing.

    ``part``: relative paths (``node_part``); None: every file in ``ckpt_dir``.
    """
    sizes = {rel: size for rel, size in local_files(ckpt_dir).items() if not is_marker(Path(rel).name)}
    files = sizes if part is None else {rel: sizes[rel] for rel in part}
    marker = Path(ckpt_dir) / marker_name(node)
    _replace_text(marker, json.dumps({"step": checkpoint_step(ckpt_dir), "node": node, "nnodes": nnodes, "files": files}))
    return marker


def listing_problem(files: dict[str, int], read: Callable[[str], bytes]) -> str | None:
    """Why a checkpoint (given as relative path -> size, and a reader) is not complete; None if it is.

    Shared by local directories and remote prefixes, so both judge a checkpoint the same way.
    """
    markers = sorted(rel for rel in files if _MARKER.match(rel))
    if not markers:
        return "it has no completion manifest (its upload was cut short)"
    manifests = []
    for rel in markers:
        try:
            m = json.loads(read(rel))
            manifests.append({"node": int(m["node"]), "nnodes": int(m["nnodes"]), "files": dict(m["files"])})
        except (ValueError, OSError, KeyError, TypeError) as e:
            return f"its manifest {rel} is unreadable ({type(e).__name__}: {e})"
    nnodes = max(m["nnodes"] for m in manifests)
    missing = sorted(set(range(nnodes)) - {m["node"] for m in manifests})
    if missing:
        return f"node(s) {missing} of {nnodes} never finished uploading their part"
    for m in manifests:
        for rel, size in m["files"].items():
            if rel not in files:
                return f"{rel} (listed by node {m['node']}) is missing"
            if files[rel] != size:
                return f"{rel} has {files[rel]} bytes, node {m['node']} wrote {size} (truncated or corrupt)"
    return None


def checkpoint_problem(ckpt_dir: Path) -> str | None:
    ckpt_dir = Path(ckpt_dir)
    return listing_problem(local_files(ckpt_dir), lambda rel: (ckpt_dir / rel).read_bytes())


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete ``checkpoint-N`` directories, newest first; each skipped one is logged with the reason."""
    if not Path(checkpoints_dir).is_dir():
        return []
    found = sorted((p for p in Path(checkpoints_dir).iterdir() if checkpoint_step(p) >= 0), key=checkpoint_step, reverse=True)
    done = []
    for ckpt in found:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            done.append(ckpt)
        else:
            logger.warning("skipping %s: %s; an older checkpoint will be used", ckpt.name, problem)
    return done


def latest_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint; newer partial or corrupt ones are skipped with a warning."""
    done = complete_checkpoints(checkpoints_dir)
    return done[0] if done else None


def best_step(trainer_state: bytes) -> int:
    """The step of ``best_model_checkpoint`` in a trainer_state.json, -1 if none."""
    best = json.loads(trainer_state).get("best_model_checkpoint")
    return checkpoint_step(best) if best else -1


def steps_to_prune(complete: list[int], present: list[int], keep: int, best: int = -1) -> list[int]:
    """Which stored steps to delete: everything older than the newest ``keep`` complete ones, except ``best``.

    Newer incomplete checkpoints stay: another node may still be uploading its part.
    """
    kept = sorted(complete, reverse=True)[:keep]
    if not kept:
        return []
    return sorted(s for s in present if s < min(kept) and s != best)


class PrefixCheckpointStore:
    """save / restore / prune / carry over six primitives of a flat key space (a directory or a bucket prefix).

    Subclasses implement ``_listing`` (checkpoint name -> relative path -> size), ``_read``,
    ``_put_files``, ``_delete``, ``_copy_in`` and ``restore``.
    """

    def _listing(self) -> dict[str, dict[str, int]]:
        raise NotImplementedError

    def _read(self, name: str, rel: str) -> bytes:
        raise NotImplementedError

    def _put_files(self, ckpt_dir: Path, rels: list[str]) -> None:
        raise NotImplementedError

    def _delete(self, name: str) -> None:
        raise NotImplementedError

    def save(self, ckpt_dir: Path) -> None:
        rels = list(local_files(ckpt_dir))
        self._put_files(ckpt_dir, [r for r in rels if not is_marker(Path(r).name)])
        self._put_files(ckpt_dir, [r for r in rels if _MARKER.match(r)])  # last: they say "complete"

    def problems(self) -> dict[str, str | None]:
        """Checkpoint name -> why it is incomplete (None: complete)."""
        return {name: listing_problem(files, lambda rel, n=name: self._read(n, rel)) for name, files in self._listing().items()}

    def contains_complete(self, name: str) -> bool:
        files = self._listing().get(name)
        return files is not None and listing_problem(files, lambda rel: self._read(name, rel)) is None

    def _copy_in(self, previous: "PrefixCheckpointStore", name: str, rels: list[str]) -> None:
        """Copy ``name``'s files ``rels`` from ``previous`` (another prefix of the same kind) into this store."""
        raise NotImplementedError

    def carry_from(self, previous: "PrefixCheckpointStore") -> list[str]:
        """Copy ``previous``'s newest complete checkpoint, and the best one it names, into this store.

        A retried attempt is given only the previous attempt's prefix to read. Carried forward
        as the attempt's first act, the newest checkpoint survives an attempt that dies in
        start-up (a preemption while the model downloads): the attempt after it finds the
        checkpoint in its predecessor's prefix. Files already here with the right size are
        skipped, so carrying twice (every node of a multi-node attempt carries) costs little;
        the manifests are copied last, so a carry cut short leaves an incomplete checkpoint
        that restore skips. Returns the names carried (empty: nothing complete to carry).
        """
        listing = previous._listing()
        complete = sorted((n for n, files in listing.items()
                           if listing_problem(files, lambda rel, n=n: previous._read(n, rel)) is None),
                          key=checkpoint_step, reverse=True)
        if not complete:
            return []
        names = [complete[0]]
        if "trainer_state.json" in listing[complete[0]]:
            best = best_step(previous._read(complete[0], "trainer_state.json"))
            if f"checkpoint-{best}" in complete[1:]:
                names.append(f"checkpoint-{best}")
        mine = self._listing()
        for name in names:
            have, files = mine.get(name, {}), listing[name]
            todo = [rel for rel, size in files.items() if have.get(rel) != size]
            self._copy_in(previous, name, [rel for rel in todo if not _MARKER.match(rel)])
            self._copy_in(previous, name, [rel for rel in todo if _MARKER.match(rel)])  # last: they say "complete"
        return names

    def prune(self, keep: int) -> list[str]:
        problems = self.problems()
        complete = [checkpoint_step(n) for n, p in problems.items() if p is None]
        best = -1
        if complete:
            newest = f"checkpoint-{max(complete)}"
            if "trainer_state.json" in self._listing()[newest]:
                best = best_step(self._read(newest, "trainer_state.json"))
        doomed = steps_to_prune(complete, [checkpoint_step(n) for n in problems], keep, best)
        for step in doomed:
            self._delete(f"checkpoint-{step}")
        return [f"checkpoint-{s}" for s in doomed]


class LocalCheckpointStore(PrefixCheckpointStore):
    """Checkpoints in ``root/checkpoint-<step>/``; each file is written to a temporary name and renamed.

    Renaming makes each file appear whole, so nodes writing the same shared file (identical
    content) never interleave, and a save killed midway leaves a checkpoint without its
    manifest, which restore skips.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.saves = 0

    def _listing(self) -> dict[str, dict[str, int]]:
        if not self.root.is_dir():
            return {}
        return {
            p.name: {rel: size for rel, size in local_files(p).items() if not rel.endswith(".part")}
            for p in self.root.iterdir()
            if checkpoint_step(p) >= 0
        }

    def _read(self, name: str, rel: str) -> bytes:
        return (self.root / name / rel).read_bytes()

    def _put_files(self, ckpt_dir: Path, rels: list[str]) -> None:
        for rel in rels:
            dest = self.root / Path(ckpt_dir).name / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
            shutil.copyfile(Path(ckpt_dir) / rel, tmp)
            os.replace(tmp, dest)

    def _delete(self, name: str) -> None:
        shutil.rmtree(self.root / name)

    def _copy_in(self, previous: "LocalCheckpointStore", name: str, rels: list[str]) -> None:
        self._put_files(previous.root / name, rels)

    def save(self, ckpt_dir: Path) -> None:
        super().save(ckpt_dir)
        self.saves += 1

    def restore(self, dest_dir: Path) -> Path | None:
        listing = self._listing()
        if not listing:
            return None
        for name, files in listing.items():
            for rel in files:
                target = Path(dest_dir) / name / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.root / name / rel, target)
        return Path(dest_dir)


def relocate(checkpoints_dir: Path) -> None:
    """Point ``best_model_checkpoint`` in restored, complete trainer states at this attempt's directory.

    The Trainer records it as an absolute path, and a retry runs in a fresh directory
    (often on another machine), so without this the best checkpoint would be lost. The
    manifests get the new size; incomplete checkpoints are left as they are (and skipped).
    Written to a new file and renamed: the old one may be hard-linked into an upload.
    """
    for ckpt in sorted(Path(checkpoints_dir).glob("checkpoint-*")):
        state_file = ckpt / "trainer_state.json"
        if not state_file.is_file() or checkpoint_problem(ckpt) is not None:
            continue
        state = json.loads(state_file.read_text())
        best = state.get("best_model_checkpoint")
        if not best:
            continue
        state["best_model_checkpoint"] = str(Path(checkpoints_dir) / Path(best).name)
        _replace_text(state_file, json.dumps(state, indent=2))
        for marker in ckpt.glob(f"{COMPLETE_MARKER}.node*"):
            manifest = json.loads(marker.read_text())
            if "trainer_state.json" in manifest["files"]:
                manifest["files"]["trainer_state.json"] = state_file.stat().st_size
                _replace_text(marker, json.dumps(manifest))


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

"""Pin what a run reads before it starts, so a cache key names content, not a moving name.

Flyte keys a cached task by its input literals. ``data.source: s3://bucket/train.jsonl`` or
``model.base_model: meta-llama/Llama-3.1-8B`` at revision ``main`` are names whose content
changes while the name stays, so keyed by the name a rerun after new data would be served
the old model. ``validate_config`` therefore resolves, once per execution:

- a hub model or dataset at a branch or tag -> the commit sha it points at now (what is then
  downloaded, recorded in the summary and the model card);
- a local file or directory -> ``sha256:`` of its bytes (files sorted by relative path);
- an object-store file or prefix (s3://, gs://, abfs://) -> ``etag:`` over every object's key
  and ETag / generation / md5 (no download), size when the store gives nothing better;
- an embedded model or dataset -> ``sha256:`` of the packaged file; a missing one is an error, never
  the digest of empty bytes.

An unreachable hub or store raises ``TransientError`` (the task retries); a missing repo,
revision or file is the user's to fix (``ConfigError`` naming the key).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import NoReturn

from llm_finetune.errors import ConfigError, TransientError, is_transient

COMMIT = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 1 << 20


def sha256_path(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes (as ``sha256sum`` prints it), or of a directory's
    files: relative path, size and bytes of each, in sorted order.

    A path that does not exist raises FileNotFoundError: its "fingerprint" would be the digest of
    no bytes at all, the same for every missing file, and a cache key built on it would hit.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory; there is nothing to fingerprint")
    h = hashlib.sha256()
    if path.is_file():
        _update(h, path)
        return "sha256:" + h.hexdigest()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\0".encode())
        _update(h, f)
    return "sha256:" + h.hexdigest()


def _update(h, file: Path) -> None:
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)


def _transient_or_config(e: Exception, transient: str, config: str) -> NoReturn:
    """Re-raise a failed lookup: a network fault as TransientError (Flyte retries the task), anything
    else as the user's ConfigError (``from None``: not retried, see errors.is_transient)."""
    if is_transient(e):
        raise TransientError(f"{transient}: {type(e).__name__}: {e}") from e
    raise ConfigError([f"{config}: {type(e).__name__}: {e}"]) from None


def object_store_fingerprint(uri: str) -> str:
    """``etag:<hex>`` over every object under ``uri`` (a file or a prefix), from listing metadata only."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri)
        found = fs.find(root, detail=True, withdirs=False) if fs.isdir(root) else {root: fs.info(root)}
    except FileNotFoundError:
        raise ConfigError([f"data.source: {uri} does not exist (no object at that key or prefix)"]) from None
    except Exception as e:
        _transient_or_config(e, f"data.source: cannot list {uri}", f"data.source: cannot read {uri}")
    if not found:
        raise ConfigError([f"data.source: {uri} is an empty prefix; no objects to train on"])
    h = hashlib.sha256()
    for key in sorted(found):
        info = found[key]
        tag = next((str(info[k]) for k in ("ETag", "etag", "generation", "md5Hash", "crc32c", "content_md5") if info.get(k)), "")
        h.update(f"{key}\0{tag}\0{info.get('size', '')}\0{'' if tag else info.get('mtime', info.get('LastModified', info.get('created', '')))}\n".encode())
    return "etag:" + h.hexdigest()


def _hub_sha(kind: str, repo_id: str, revision: str, key: str) -> str:
    """Commit sha of a hub ``kind`` ("model" or "dataset") repo at ``revision``."""
    if COMMIT.match(revision):
        return revision
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        print(f"[validate] HF_HUB_OFFLINE is set: {kind} {repo_id} stays at revision {revision!r} (not pinned to a commit)", flush=True)
        return revision
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().repo_info(repo_id, repo_type=kind, revision=revision)
    except RevisionNotFoundError:
        raise ConfigError([f"{key}: revision {revision!r} does not exist for the hub {kind} {repo_id}"]) from None
    except GatedRepoError:
        raise ConfigError([f"{key}: the hub {kind} {repo_id} is gated; accept its licence on the hub and provide HF_TOKEN"]) from None
    except RepositoryNotFoundError:
        raise ConfigError([f"{key}: no hub {kind} {repo_id!r} (or it is private and HF_TOKEN is missing); check the id"]) from None
    except Exception as e:
        _transient_or_config(e, f"{key}: the hub did not answer for {kind} {repo_id}",
                             f"{key}: cannot resolve {kind} {repo_id} at {revision!r}")
    return info.sha


def model_revision(base_model: str, revision: str) -> str:
    """What ``model.revision`` pins ``model.base_model`` to for this run (see the module docstring)."""
    if base_model.startswith("embedded://"):
        from llm_finetune.model import EMBEDDED_GGUF, embedded_gguf

        return sha256_path(embedded_gguf(base_model)) if base_model in EMBEDDED_GGUF else revision
    local = Path(base_model).expanduser()
    if local.exists():
        return sha256_path(local)
    return _hub_sha("model", base_model, revision or "main", "model.revision")


def data_revision(source: str, revision: str = "") -> str:
    """What ``data.revision`` pins ``data.source`` to for this run (see the module docstring)."""
    from llm_finetune.data.sources import EMBEDDED, looks_like_file

    if source.startswith("embedded://"):
        if source not in EMBEDDED:
            return revision  # an unknown name: reading it fails with the list of embedded datasets
        packaged = EMBEDDED[source]
        if not packaged.is_file():  # the code arrived without its data files (pyflyte run --remote, --copy auto)
            raise ConfigError([
                f"data.source: {source} is the packaged file {packaged}, which is missing here. On a cluster, run "
                "pyflyte run --remote --copy all (the images hold no source; --copy auto ships only Python modules); "
                "locally, restore llm_finetune/data/ from the repository."
            ])
        return sha256_path(packaged)
    local = Path(source[len("file://"):] if source.startswith("file://") else source).expanduser()
    if (source.startswith("file://") or "://" not in source) and local.exists():
        return sha256_path(local)
    if "://" in source:
        return object_store_fingerprint(source)
    if looks_like_file(source):
        raise ConfigError([f"data.source: file not found: {source}. Check the path (relative paths are relative to where you run pyflyte)."])
    return _hub_sha("dataset", source, revision or "main", "data.revision")

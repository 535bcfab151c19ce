"""Forget local cache entries whose outputs were deleted, so a local run recomputes them instead of crashing.

A local ``pyflyte run`` caches each task's outputs in flytekit's local cache (``~/.flyte/local-cache``),
and a file or folder output is cached as its path: the base model, the data splits, the trained and
quantized models live under ``$TMPDIR``. When ``/tmp`` is wiped (a reboot, tmpwatch, a clean-up), the
cache still hands out those paths, and the next task fails converting its input with flytekit's
``Expected a directory, but the given uri '/tmp/base-model-...' is not a directory``, before any of our
code runs. ``validate_config``, the first task of ``fine_tune``, calls ``forget_missing_outputs`` on a
local run: an entry that names a local path that no longer exists is deleted (and said), so its task runs
again, and so does everything downstream of it (their cache keys hold the old path). Remote runs keep
outputs in the blob store and are never touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import msgpack
from flyteidl.core import literals_pb2
from flytekit.core.local_cache import LocalTaskCache


def _local_path(uri: str) -> str | None:
    """The file system path of a local output; None for a blob store URI (s3://, gs://...), never checked."""
    return uri.removeprefix("file://") if uri.startswith(("/", "file://")) else None


def _paths_in_msgpack(value) -> Iterator[str]:
    """flytekit writes a dataclass's FlyteFile/FlyteDirectory fields as {"path": uri} and its StructuredDataset
    fields as {"uri": uri, "file_format": ...} (their ``_serialize``)."""
    if isinstance(value, dict):
        keys = set(value)
        if keys == {"path"} and isinstance(value["path"], str):
            yield value["path"]
        elif keys == {"uri", "file_format"} and isinstance(value["uri"], str):
            yield value["uri"]
        else:
            for v in value.values():
                yield from _paths_in_msgpack(v)
    elif isinstance(value, list):
        for v in value:
            yield from _paths_in_msgpack(v)


def _paths_in_literal(literal: literals_pb2.Literal) -> Iterator[str]:
    kind = literal.WhichOneof("value")
    if kind == "collection":
        for lit in literal.collection.literals:
            yield from _paths_in_literal(lit)
    elif kind == "map":
        for lit in literal.map.literals.values():
            yield from _paths_in_literal(lit)
    elif kind == "scalar":
        scalar = literal.scalar
        which = scalar.WhichOneof("value")
        if which == "blob":
            yield scalar.blob.uri
        elif which == "structured_dataset":
            yield scalar.structured_dataset.uri
        elif which == "schema":
            yield scalar.schema.uri
        elif which == "union":
            yield from _paths_in_literal(scalar.union.value)
        elif which == "binary" and scalar.binary.tag == "msgpack":
            yield from _paths_in_msgpack(msgpack.loads(scalar.binary.value, strict_map_key=False))


def missing_outputs(cached: bytes) -> list[str]:
    """The local paths named by one cached output map (flytekit stores its serialized LiteralMap) that are gone."""
    outputs = literals_pb2.LiteralMap()
    outputs.ParseFromString(cached)
    local = {_local_path(uri) for lit in outputs.literals.values() for uri in _paths_in_literal(lit)} - {None}
    return sorted(path for path in local if not os.path.exists(path))


def forget_missing_outputs() -> dict[str, list[str]]:
    """Delete every local cache entry that names a deleted local path; {entry key: its missing paths}."""
    if not LocalTaskCache._initialized:
        LocalTaskCache.initialize()
    cache = LocalTaskCache._cache
    forgotten = {}
    for key in list(cache.iterkeys()):
        value = cache.get(key)
        if not isinstance(value, bytes):  # flytekit < 1.13 pickled model objects; nothing of ours is that old
            continue
        try:
            gone = missing_outputs(value)
        except Exception:  # an entry we cannot read is flytekit's business, not a reason to fail the run
            continue
        if gone:
            cache.delete(key)
            forgotten[key] = gone
    return forgotten


def report_forgotten(forgotten: dict[str, list[str]]) -> None:
    """One line per forgotten entry: which task will run again, and the path that was deleted."""
    for key, gone in forgotten.items():
        task = key.split("-", 1)[0]
        more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
        print(f"[cache] {task}: its cached output {gone[0]}{more} no longer exists; forgotten, it runs again")

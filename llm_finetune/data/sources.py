"""Read raw rows from wherever the user keeps them: embedded, local or fsspec files, or the hub.

Every failure becomes a ``DataError`` that names the source and says how to fix it,
instead of a traceback from deep inside pandas, fsspec or datasets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from llm_finetune.config import EMBEDDED_DATASET, EMBEDDED_PREFERENCE_DATASET, EMBEDDED_UNPAIRED_DATASET
from llm_finetune.errors import DataError, TransientError, is_transient

FILE_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EMBEDDED = {
    EMBEDDED_DATASET: Path(__file__).with_name("iso_dates.jsonl"),
    EMBEDDED_PREFERENCE_DATASET: Path(__file__).with_name("iso_dates_preference.jsonl"),  # DPO / ORPO pairs
    EMBEDDED_UNPAIRED_DATASET: Path(__file__).with_name("iso_dates_unpaired.jsonl"),  # KTO: answers with a thumbs up/down
}


def is_content_fingerprint(revision: str) -> bool:
    """True for the ``sha256:``/``etag:`` fingerprints of files, which are not hub revisions."""
    return revision.startswith(("sha256:", "etag:"))


def looks_like_file(source: str) -> bool:
    return "://" in source or source.startswith((".", "/", "~")) or Path(source).suffix.lower() in FILE_SUFFIXES


def load_raw(source: str, subset: str = "", split: str = "train", revision: str = "") -> pd.DataFrame:
    """Load the source into a DataFrame, one row per record, columns as in the source.

    ``revision``: for hub datasets the branch, tag or (after validate_config) commit to read.
    """
    if source.startswith("embedded://"):
        if source not in EMBEDDED:
            raise DataError(f"data.source: unknown embedded dataset {source!r}; available: {', '.join(EMBEDDED)}")
        return _read_file(str(EMBEDDED[source]))
    local = Path(source).expanduser()
    if local.is_dir():  # a dataset repository on disk reads like a hub id (configs, splits)
        return _read_hub(str(local), subset, split)
    if looks_like_file(source):
        return _read_file(source)
    return _read_hub(source, subset, split, revision)


def _read_file(uri: str) -> pd.DataFrame:
    import fsspec

    suffix = Path(uri.split("?")[0]).suffix.lower()
    kind = FILE_SUFFIXES.get(suffix)
    if kind is None:
        raise DataError(
            f"data.source: {uri!r} has suffix {suffix or '(none)'}; supported files are "
            f"{', '.join(FILE_SUFFIXES)} (or give a hub dataset id)"
        )
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(path):
            raise DataError(f"data.source: file not found: {uri}. Check the path (relative paths are relative to where you run pyflyte).")
        with fs.open(path, "rb") as f:
            raw = f.read()
    except DataError:
        raise
    except ImportError as e:
        raise DataError(f"data.source: {uri!r} needs an fsspec backend that is not installed ({e}); e.g. pip install s3fs or gcsfs") from None
    except Exception as e:  # permissions, network, bad URL
        if is_transient(e):
            raise TransientError(f"data.source: cannot read {uri} (transient): {type(e).__name__}: {e}") from e
        raise DataError(f"data.source: cannot read {uri}: {type(e).__name__}: {e}") from None
    if kind == "parquet":
        import io

        try:
            return pd.read_parquet(io.BytesIO(raw))
        except Exception as e:
            raise DataError(f"data.source: {uri} is not a readable parquet file: {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"data.source: {uri} is not UTF-8 text: invalid byte 0x{raw[e.start]:02x} at line {line} "
            f"(byte offset {e.start}). Re-save the file as UTF-8."
        ) from None
    if kind == "jsonl":
        return _read_jsonl(text, uri)
    if kind == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"data.source: {uri} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"data.source: {uri} must hold a list of records (or one key holding such a list)")
            data = lists[0]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"data.source: {uri} must hold a list of JSON objects, one per record")
        return pd.DataFrame.from_records(data)
    import io

    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except Exception as e:
        raise DataError(f"data.source: {uri} is not a readable CSV file: {e}") from None


def _read_jsonl(text: str, uri: str) -> pd.DataFrame:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data.source: {uri} line {lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"data.source: {uri} line {lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return pd.DataFrame.from_records(records)


def _read_hub(dataset_id: str, subset: str, split: str, revision: str = "") -> pd.DataFrame:
    import datasets

    pinned = {"revision": revision} if revision and not is_content_fingerprint(revision) else {}
    try:
        ds = datasets.load_dataset(dataset_id, subset or None, split=split, **pinned)
    except Exception as e:
        message = (
            f"data.source: cannot load hub dataset {dataset_id!r} (subset={subset or 'default'}, split={split}): "
            f"{type(e).__name__}: {e}. Check the id, data.subset and data.split, your network and HF_TOKEN "
            "for gated datasets; or point data.source at a local file."
        )
        if is_transient(e) and not _hub_offline():  # offline mode is a setting, not a fault a retry fixes
            raise TransientError(message) from e
        raise DataError(message) from None
    return ds.to_pandas()


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)

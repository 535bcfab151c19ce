"""Turn rows of any supported format into one canonical shape.

Canonical frame, one row per example:
- ``messages``: JSON list of ``{"role", "content"}`` (instruction and chat data), else ""
- ``text``: raw text for continued pre-training, else ""
- ``source_row``: 1-based row number in the source, so errors can point at it

Alpaca (instruction, input, output), Dolly (instruction, context, response) and chat
(``messages``) become conversations; ``text`` stays text. ``data.columns`` maps canonical
column names to the source's own, e.g. ``{instruction: question, output: answer}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from llm_finetune.errors import DataError

FORMAT_COLUMNS = {
    "alpaca": (("instruction", "output"), ("input",)),
    "dolly": (("instruction", "response"), ("context",)),
    "chat": (("messages",), ()),
    "text": (("text",), ()),
    "preference": (("chosen", "rejected"), ("prompt",)),  # handled by data/preference.py
}
ROLES = ("system", "user", "assistant")


@dataclass
class Detected:
    format: str
    reason: str


def explode_records(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """One row per element of the list in ``column``; an element's fields become ``column.field``.

    For nested data such as Alpaca's seed tasks (``instances: [{input, output}, ...]``).
    Other columns are repeated on every element's row; row numbers in later errors count
    the exploded rows.
    """
    if column not in df.columns:
        raise DataError(
            f"data.explode: column {column!r} is not in the data; the data's columns are: {', '.join(map(str, df.columns))}"
        )
    rows = []
    for i, rec in enumerate(df.to_dict(orient="records"), start=1):
        items = rec.pop(column)
        if hasattr(items, "tolist"):  # numpy array from parquet
            items = items.tolist()
        if items is None or (isinstance(items, float) and pd.isna(items)):
            items = []
        if not isinstance(items, list):
            raise DataError(f"data.explode: row {i}, column {column}: expected a list, got {type(items).__name__}")
        for item in items:
            flat = {f"{column}.{k}": v for k, v in item.items()} if isinstance(item, dict) else {column: item}
            rows.append({**rec, **flat})
    if not rows:
        raise DataError(f"data.explode: every list in column {column!r} is empty, so there are no rows")
    return pd.DataFrame.from_records(rows)


def _nested(df: pd.DataFrame, path: str) -> pd.Series | None:
    """Values of ``a.b.c`` when column ``a`` holds mappings; None when there is no such path."""
    head, _, rest = path.partition(".")
    if head not in df.columns or not rest:
        return None

    def get(value):
        for key in rest.split("."):
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    values = df[head].map(get)
    return values if values.notna().any() else None


def apply_column_mapping(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Rename source columns to canonical ones; ``a.b`` reaches into a column of mappings."""
    df = df.copy()
    for src in columns.values():
        if src not in df.columns and "." in src:
            values = _nested(df, src)
            if values is not None:
                df[src] = values
    missing = [src for src in columns.values() if src not in df.columns]
    if missing:
        raise DataError(
            f"data.columns maps to column(s) {missing} that the data does not have; "
            f"the data's columns are: {', '.join(map(str, df.columns))}"
            + ("; for a column holding a list of records, set data.explode to it" if any("." in m for m in missing) else "")
        )
    return df.rename(columns={src: canon for canon, src in columns.items()})


def detect_format(columns: list[str], requested: str = "auto") -> Detected:
    """Pick the format from the columns (``auto``) or check that the requested one fits."""
    cols = set(columns)
    if requested != "auto":
        required, _ = FORMAT_COLUMNS[requested]
        missing = [c for c in required if c not in cols]
        if missing:
            raise DataError(
                f"data.format is {requested!r}, which needs column(s) {', '.join(required)}, but {', '.join(missing)} "
                f"missing; the data has: {', '.join(sorted(cols))}. Map your columns with data.columns, "
                f"e.g. columns: {{{missing[0]}: <your column>}}"
            )
        return Detected(requested, f"format {requested!r} set in the config")
    for name in ("chat", "alpaca", "dolly", "text"):
        required, optional = FORMAT_COLUMNS[name]
        if all(c in cols for c in required):
            used = [c for c in required + optional if c in cols]
            return Detected(name, f"auto-detected {name!r} from columns {', '.join(used)}")
    expected = "; ".join(f"{k}: {', '.join(v[0])}" for k, v in FORMAT_COLUMNS.items())
    raise DataError(
        f"data.format auto: cannot tell the format from columns {', '.join(sorted(cols))}. Expected one of "
        f"[{expected}]. Set data.format and map your column names with data.columns."
    )


def _text(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def _join(first: str, second: str) -> str:
    return f"{first}\n\n{second}" if second.strip() else first


def _chat_messages(value, row: int) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"row {row}, column messages: not a JSON list of messages") from None
    if hasattr(value, "tolist"):  # numpy array from parquet
        value = value.tolist()
    if not isinstance(value, list):
        raise DataError(f"row {row}, column messages: expected a list of {{role, content}}, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"row {row}, column messages, message {i}: expected an object with 'role' and 'content'")
        role = _text(m["role"]).strip().lower()
        if role not in ROLES:
            raise DataError(
                f"row {row}, column messages, message {i}: unknown role {m['role']!r}; roles must be one of "
                f"{', '.join(ROLES)}"
            )
        out.append({"role": role, "content": _text(m["content"])})
    return out


def to_canonical(df: pd.DataFrame, fmt: str) -> pd.DataFrame:
    """Rows in ``fmt`` to the canonical frame (see module docstring)."""
    messages, texts = [], []
    for i, rec in enumerate(df.to_dict(orient="records"), start=1):
        if fmt == "text":
            messages.append("")
            texts.append(_text(rec["text"]))
            continue
        if fmt == "chat":
            conv = _chat_messages(rec["messages"], i)
        elif fmt == "alpaca":
            conv = [
                {"role": "user", "content": _join(_text(rec["instruction"]), _text(rec.get("input")))},
                {"role": "assistant", "content": _text(rec["output"])},
            ]
        elif fmt == "dolly":
            conv = [
                {"role": "user", "content": _join(_text(rec["instruction"]), _text(rec.get("context")))},
                {"role": "assistant", "content": _text(rec["response"])},
            ]
        else:  # pragma: no cover - guarded by config validation
            raise DataError(f"data.format: unknown format {fmt!r}")
        if "system" in rec and _text(rec.get("system")).strip() and fmt != "chat":
            conv.insert(0, {"role": "system", "content": _text(rec["system"])})
        messages.append(json.dumps(conv, ensure_ascii=False))
        texts.append("")
    return pd.DataFrame({"messages": messages, "text": texts, "source_row": range(1, len(df) + 1)})

"""get_data's core: load -> detect format -> canonicalise -> tokenize -> validate -> split.

Deterministic: the same source, config and tokenizer give byte-identical frames, so
Flyte's cache keys downstream of get_data stay stable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pandas as pd

from llm_finetune.config import DataConfig
from llm_finetune.data.formats import apply_column_mapping, detect_format, to_canonical
from llm_finetune.data.sources import load_raw
from llm_finetune.data.validation import RULES, ValidationReport, validate_rows
from llm_finetune.encoding import encode_row
from llm_finetune.errors import DataError

CANONICAL_COLUMNS = ["messages", "text", "source_row", "n_tokens", "n_trained_tokens"]


@dataclass
class PreparedData:
    train: pd.DataFrame
    eval: pd.DataFrame
    format: str
    format_reason: str
    report: ValidationReport


def _summaries(canon: pd.DataFrame) -> tuple[list[str], list[str]]:
    prompts, completions = [], []
    for m in canon["messages"]:
        if not m:
            prompts.append("")
            completions.append("")
            continue
        conv = json.loads(m)
        prompts.append("\n".join(t["content"] for t in conv if t["role"] != "assistant"))
        completions.append("\n".join(t["content"] for t in conv if t["role"] == "assistant"))
    return prompts, completions


def split_frame(frame: pd.DataFrame, eval_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic split: rows ordered by a seeded hash of their content, not by position."""
    keys = [hashlib.sha256(f"{seed}:{k}".encode()).hexdigest() for k in frame["content_key"]]
    order = frame.assign(_k=keys).sort_values("_k", kind="stable")
    n_eval = max(1, round(eval_fraction * len(frame)))
    ev = order.iloc[:n_eval].sort_values("source_row")
    tr = order.iloc[n_eval:].sort_values("source_row")
    return tr.drop(columns="_k"), ev.drop(columns="_k")


def prepare(cfg: DataConfig, tokenizer) -> PreparedData:
    raw = load_raw(cfg.source, cfg.subset, cfg.split)
    if len(raw) == 0:
        raise DataError(f"data.source: {cfg.source} holds no rows")
    if cfg.columns:
        raw = apply_column_mapping(raw, cfg.columns)
    detected = detect_format(list(map(str, raw.columns)), cfg.format)
    canon = to_canonical(raw, detected.format)
    is_text = detected.format == "text"

    n_tokens, n_trained = [], []
    for row in canon.to_dict(orient="records"):
        if is_text and not row["text"].strip():
            n_tokens.append(0), n_trained.append(0)
            continue
        enc = encode_row(tokenizer, row, train_on_prompt=cfg.train_on_prompt, template=cfg.prompt_template)
        n_tokens.append(len(enc.input_ids))
        n_trained.append(enc.trained_tokens)
    canon["n_tokens"] = pd.Series(n_tokens, dtype="int64")
    canon["n_trained_tokens"] = pd.Series(n_trained, dtype="int64")
    canon["content_key"] = [hashlib.sha256((m or t).encode()).hexdigest() for m, t in zip(canon["messages"], canon["text"])]
    frame = canon.copy()
    if not is_text:
        frame["prompt"], frame["completion"] = _summaries(canon)
    else:
        frame["n_tokens"] = frame["n_tokens"].clip(lower=1)  # empty text is reported as empty_text, not as 0 tokens

    kept, report = validate_rows(frame, cfg.max_length, is_text)
    if report.dropped and cfg.on_invalid == "fail":
        head = report.failure_cases.head(10)
        cases = "\n".join(f"  row {r.source_row}: {r.rule} ({RULES.get(r.rule, r.rule)}) in column {r.column}" for r in head.itertuples())
        raise DataError(
            f"data.on_invalid is 'fail' and {report.rows_in - report.rows_kept} of {report.rows_in} rows in "
            f"{cfg.source} break a rule: {report.dropped}\n{cases}\nFix the rows, or set data.on_invalid: drop."
        )
    if len(kept) == 0:
        raise DataError(f"data.source: all {report.rows_in} rows of {cfg.source} are invalid: {report.dropped}")
    train, ev = split_frame(kept, cfg.eval_fraction, cfg.seed)
    if len(train) < cfg.min_train_rows:
        raise DataError(
            f"only {len(train)} training rows remain from {report.rows_in} in {cfg.source} "
            f"(dropped: {report.dropped or 'none'}; {len(ev)} held out), fewer than data.min_train_rows="
            f"{cfg.min_train_rows}. Add data, fix the dropped rows, or lower data.eval_fraction."
        )
    cols = CANONICAL_COLUMNS
    return PreparedData(
        train=train[cols].reset_index(drop=True),
        eval=ev[cols].reset_index(drop=True),
        format=detected.format,
        format_reason=detected.reason,
        report=report,
    )

"""get_data's core: load -> detect format -> canonicalise -> tokenize -> validate -> split -> pack.

Deterministic: the same source, config and tokenizer give byte-identical frames, so
Flyte's cache keys downstream of get_data stay stable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pandas as pd

from llm_finetune.config import DataConfig
from llm_finetune.data.formats import apply_column_mapping, detect_format, explode_records, to_canonical
from llm_finetune.data.sources import load_raw
from llm_finetune.data.validation import RULES, ValidationReport, validate_rows
from llm_finetune.encoding import IGNORE_INDEX, Encoded, encode_many, encode_row, encode_text
from llm_finetune.errors import DataError
from llm_finetune.packing import mask_first_label, pack_examples, packing_efficiency

CANONICAL_COLUMNS = ["messages", "text", "source_row", "n_tokens", "n_trained_tokens"]
TOKEN_COLUMNS = ["input_ids", "labels", "seq_lens", "source_rows"]


@dataclass
class PreparedData:
    train: pd.DataFrame  # canonical rows (CANONICAL_COLUMNS)
    eval: pd.DataFrame  # canonical held-out rows
    train_tokens: pd.DataFrame  # model-ready rows (TOKEN_COLUMNS), packed when data.packing
    format: str
    format_reason: str
    report: ValidationReport
    lengths: pd.Series = None  # tokens per non-empty row as read, before validation and truncation
    truncated_rows: int = 0  # rows cut to data.max_length (data.truncation)
    packing_efficiency: float = 0.0  # real tokens / (rows * max_length) of train_tokens


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


def token_rows(encoded: dict[int, Encoded], source_rows: list[int], cfg: DataConfig, is_text: bool) -> pd.DataFrame:
    """Model-ready rows of the given examples: truncated or cut into blocks, then packed.

    Text for continued pre-training is cut into ``max_length`` blocks; instruction rows
    are at most ``max_length`` here (longer ones were dropped, or truncated when
    ``data.truncation``). Every example's first label is -100 (nothing precedes it).
    """
    n = cfg.max_length
    examples = []
    for row in source_rows:
        enc = encoded[row]
        starts = range(0, len(enc.input_ids), n) if is_text else [0]
        for start in starts:
            ids, labels = enc.input_ids[start : start + n], mask_first_label(enc.labels[start : start + n])
            if any(x != IGNORE_INDEX for x in labels):
                examples.append({"input_ids": ids, "labels": labels, "source_row": row})
    if cfg.packing:
        rows = pack_examples(examples, n)
    else:
        rows = [
            {"input_ids": e["input_ids"], "labels": e["labels"], "seq_lens": [len(e["input_ids"])], "source_rows": [e["source_row"]]}
            for e in examples
        ]
    return pd.DataFrame.from_records(rows, columns=TOKEN_COLUMNS)


def _describe_case(case, cfg: DataConfig) -> str:
    where = f"  row {case.source_row}: {case.rule} ({RULES.get(case.rule, case.rule)})"
    if case.rule == "too_long":
        return (
            f"{where}: {case.value} tokens, data.max_length is {cfg.max_length}; raise data.max_length, "
            "set data.truncation: true, or shorten the row"
        )
    return f"{where} in column {case.column}"


def encode_canonical(tokenizer, canon: pd.DataFrame, cfg: DataConfig, chunk: int = 2048) -> dict[int, Encoded]:
    """Encode every row (batched tokenizer calls); empty text rows are left out for validation."""
    encoded: dict[int, Encoded] = {}
    rows = canon.to_dict(orient="records")
    texts = [r for r in rows if not r["messages"]]
    for r in texts:
        if r["text"].strip():
            encoded[r["source_row"]] = encode_text(tokenizer, r["text"])
    convs = [r for r in rows if r["messages"]]
    for start in range(0, len(convs), chunk):
        part = convs[start : start + chunk]
        try:
            encs = encode_many(
                tokenizer, [json.loads(r["messages"]) for r in part],
                train_on_prompt=cfg.train_on_prompt, template=cfg.prompt_template,
            )
        except DataError:  # find the row, so the error can name it
            for r in part:
                try:
                    encode_row(tokenizer, r, train_on_prompt=cfg.train_on_prompt, template=cfg.prompt_template)
                except DataError as e:
                    raise DataError(f"data.source: {cfg.source} row {r['source_row']}: {e}") from None
            raise
        encoded.update({r["source_row"]: e for r, e in zip(part, encs)})
    return encoded


def prepare(cfg: DataConfig, tokenizer) -> PreparedData:
    raw = load_raw(cfg.source, cfg.subset, cfg.split, cfg.revision)
    if len(raw) == 0:
        raise DataError(f"data.source: {cfg.source} holds no rows")
    if cfg.explode.strip():
        raw = explode_records(raw, cfg.explode.strip())
    if cfg.columns:
        raw = apply_column_mapping(raw, cfg.columns)
    detected = detect_format(list(map(str, raw.columns)), cfg.format)
    canon = to_canonical(raw, detected.format)
    is_text = detected.format == "text"

    n_tokens, n_trained = [], []
    encoded = encode_canonical(tokenizer, canon, cfg)
    for row in canon["source_row"]:
        enc = encoded.get(row)
        n_tokens.append(len(enc.input_ids) if enc else 0)
        n_trained.append(enc.trained_tokens if enc else 0)
    canon["n_tokens"] = pd.Series(n_tokens, dtype="int64")
    canon["n_trained_tokens"] = pd.Series(n_trained, dtype="int64")
    canon["content_key"] = [hashlib.sha256((m or t).encode()).hexdigest() for m, t in zip(canon["messages"], canon["text"])]
    frame = canon.copy()
    if not is_text:
        frame["prompt"], frame["completion"] = _summaries(canon)
    else:
        frame["n_tokens"] = frame["n_tokens"].clip(lower=1)  # empty text is reported as empty_text, not as 0 tokens

    limit = None if (is_text or cfg.truncation) else cfg.max_length
    kept, report = validate_rows(frame, limit, is_text)
    if report.dropped and cfg.on_invalid == "fail":
        head = report.failure_cases.head(10)
        cases = "\n".join(_describe_case(r, cfg) for r in head.itertuples())
        raise DataError(
            f"data.on_invalid is 'fail' and {report.rows_in - report.rows_kept} of {report.rows_in} rows in "
            f"{cfg.source} break a rule: {report.dropped}\n{cases}\nFix the rows, or set data.on_invalid: drop."
        )
    if len(kept) == 0:
        raise DataError(
            f"data.source: all {report.rows_in} rows of {cfg.source} are invalid: {report.dropped} "
            f"({'; '.join(f'{k}: {RULES.get(k, k)}' for k in report.dropped)}). The validation deck lists each row."
        )
    train, ev = split_frame(kept, cfg.eval_fraction, cfg.seed)
    if len(train) < cfg.min_train_rows:
        raise DataError(
            f"only {len(train)} training rows remain from {report.rows_in} in {cfg.source} "
            f"(dropped: {report.dropped or 'none'}; {len(ev)} held out), fewer than data.min_train_rows="
            f"{cfg.min_train_rows}. Add data, fix the dropped rows, or lower data.eval_fraction."
        )
    truncated = 0
    if cfg.truncation and not is_text:
        for row in kept["source_row"]:
            enc = encoded[row]
            if len(enc.input_ids) > cfg.max_length:
                encoded[row] = Encoded(enc.input_ids[: cfg.max_length], enc.labels[: cfg.max_length])
                truncated += 1
    tokens = token_rows(encoded, train["source_row"].tolist(), cfg, is_text)
    if tokens.empty:
        raise DataError(
            f"no training tokens carry loss in {cfg.source}: every kept row's completion is empty after "
            "tokenization or truncation. Check the completion column, or raise data.max_length."
        )
    cols = CANONICAL_COLUMNS
    return PreparedData(
        train=train[cols].reset_index(drop=True),
        eval=ev[cols].reset_index(drop=True),
        train_tokens=tokens,
        format=detected.format,
        format_reason=detected.reason,
        report=report,
        lengths=frame.loc[frame["n_tokens"] > 0, "n_tokens"].reset_index(drop=True),
        truncated_rows=truncated,
        packing_efficiency=packing_efficiency(tokens["seq_lens"].tolist(), cfg.max_length),
    )

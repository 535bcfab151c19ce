"""get_data's core: load -> detect format -> canonicalise -> tokenize -> fit the length ->
validate -> split train / validation / test -> pack.

Deterministic: the same source, config and tokenizer give byte-identical frames, so
Flyte's cache keys downstream of get_data stay stable.

The three splits have separate jobs: train is trained on, validation chooses the
checkpoint and stops training early, test scores base vs tuned and is seen by nothing
else. Rows that share a prompt are kept in one split, so a prompt answered twice in the
data cannot be trained on and then scored. Validation and test rows carry their token
rows too (``input_ids``, ``labels``, ``seq_lens``: fitted to max_length exactly as the
training rows), so every later task scores what training saw without knowing the length.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import pandas as pd

from llm_finetune.config import DataConfig, TrainConfig, effective_test_fraction, overlong_policy
from llm_finetune.data.lengths import LengthChoice, choose_max_length
from llm_finetune.data.formats import apply_column_mapping, detect_format, explode_records, to_canonical
from llm_finetune.data.prepared import (  # noqa: F401 - PreparedData and split_frame re-exported for callers
    PreparedData, check_drop_fraction, describe_case, split_frame,
)
from llm_finetune.data.preference import detect_preference, prepare_preference
from llm_finetune.data.unpaired import detect_unpaired, prepare_unpaired
from llm_finetune.data.sources import load_raw
from llm_finetune.data.validation import RULES, validate_rows
from llm_finetune.encoding import IGNORE_INDEX, Encoded, encode_many, encode_row, encode_text
from llm_finetune.errors import DataError
from llm_finetune.training.packing import mask_first_label, pack_examples, packing_efficiency

CANONICAL_COLUMNS = ["messages", "text", "source_row", "n_tokens", "n_trained_tokens"]
TOKEN_COLUMNS = ["input_ids", "labels", "seq_lens", "source_rows"]
HELDOUT_COLUMNS = CANONICAL_COLUMNS + ["input_ids", "labels", "seq_lens"]  # validation and test rows


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


def group_keys(frame: pd.DataFrame, is_text: bool) -> list[str]:
    """Rows with the same key stay in one split: the prompt (instruction rows) or the text."""
    return list(frame["content_key"]) if is_text else [hashlib.sha256(p.strip().encode()).hexdigest() for p in frame["prompt"]]


def token_rows(encoded: dict[int, Encoded], source_rows: list[int], cfg: DataConfig, is_text: bool, n: int) -> pd.DataFrame:
    """Model-ready rows of the given examples: cut into blocks, then packed.

    Text for continued pre-training is cut into ``n``-token blocks; instruction rows are at
    most ``n`` here (longer ones were dropped, or their prompt cut by
    ``data.overlong: truncate_prompt``). Every example's first label is -100 (nothing precedes it).
    """
    examples = []
    for row in source_rows:
        enc = encoded[row]
        starts = range(0, len(enc.input_ids), n) if is_text else [0]
        for start in starts:
            ids, labels = enc.input_ids[start : start + n], mask_first_label(enc.labels[start : start + n])
            if any(x != IGNORE_INDEX for x in labels):
                examples.append({"input_ids": ids, "labels": labels, "source_row": row})
    if cfg.packing:
        rows = pack_examples(examples, n)  # deterministic best-fit decreasing
    else:
        rows = [
            {"input_ids": e["input_ids"], "labels": e["labels"], "seq_lens": [len(e["input_ids"])], "source_rows": [e["source_row"]]}
            for e in examples
        ]
    return pd.DataFrame.from_records(rows, columns=TOKEN_COLUMNS)


def heldout_rows(frame: pd.DataFrame, encoded: dict[int, Encoded], n: int) -> pd.DataFrame:
    """Canonical rows plus one token row each (text: its first ``n`` tokens)."""
    out = frame[CANONICAL_COLUMNS].copy()
    ids, labels = [], []
    for row in out["source_row"]:
        enc = encoded[row]
        ids.append(enc.input_ids[:n])
        labels.append(mask_first_label(enc.labels[:n]))
    out["input_ids"], out["labels"] = ids, labels
    out["seq_lens"] = [[len(x)] for x in ids]
    return out.reset_index(drop=True)


def required_tokens(n_tokens: int, enc: Encoded | None, policy: str) -> int:
    """Tokens of a row that must fit in max_length: all, or the completion alone when the prompt may be cut."""
    if enc is None:
        return n_tokens
    return n_tokens - enc.prompt_tokens if policy == "truncate_prompt" else n_tokens


def truncate_prompt(enc: Encoded, n: int) -> Encoded:
    """Cut the prompt from the left so the row fits in ``n`` tokens; the completion is kept whole."""
    cut = len(enc.input_ids) - n
    if cut <= 0:
        return enc
    if cut > enc.prompt_tokens:  # pragma: no cover - validation drops these rows as too_long first
        raise DataError(f"a completion of {len(enc.input_ids) - enc.prompt_tokens} tokens cannot fit in {n}")
    return Encoded(enc.input_ids[cut:], enc.labels[cut:], enc.prompt_tokens - cut)


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


def prepare(cfg: DataConfig, tokenizer, choose_length: Callable[[list[int], int], LengthChoice] | None = None,
            kind: str | None = None) -> PreparedData:
    """``choose_length(lengths, requested)`` fits ``data.max_length`` (the task passes the model and
    hardware, see lengths.choose_max_length); by default only the data and the request count.

    ``kind``: the rows the training method takes (``Method.data``: sft, preference, unpaired); data
    of another kind is refused here, before any training, naming the methods that take it."""
    raw = load_raw(cfg.source, cfg.subset, cfg.split, cfg.revision)
    if len(raw) == 0:
        raise DataError(f"data.source: {cfg.source} holds no rows")
    if cfg.explode.strip():
        raw = explode_records(raw, cfg.explode.strip())
    if cfg.columns:
        raw = apply_column_mapping(raw, cfg.columns)
    columns = list(map(str, raw.columns))
    found = [(k, d) for k, d in (("preference", detect_preference(columns, cfg.format)),
                                 ("unpaired", detect_unpaired(columns, cfg.format))) if d is not None]
    found_kind = found[0][0] if found else "sft"
    if kind is not None and found_kind != kind:
        from llm_finetune.methods import METHODS

        takes = " or ".join(n for n, m in METHODS.items() if m.data == found_kind)
        wants = " or ".join(n for n, m in METHODS.items() if m.data == kind)
        raise DataError(
            f"data.source: {cfg.source} holds {found_kind} rows ({found[0][1].reason if found else 'columns ' + ', '.join(columns)}), "
            f"which train with train.method {takes}; the configured method needs {kind} rows (train.method {wants}). "
            "Point data.source at the right data, set data.format, or change train.method"
        )
    if found_kind == "preference":  # chosen/rejected pairs: data/preference.py
        return prepare_preference(raw, cfg, tokenizer, found[0][1], choose_length)
    if found_kind == "unpaired":  # labelled single answers (KTO): data/unpaired.py
        return prepare_unpaired(raw, cfg, tokenizer, found[0][1], choose_length)
    detected = detect_format(columns, cfg.format)
    canon = to_canonical(raw, detected.format)
    is_text = detected.format == "text"
    policy = overlong_policy(cfg)

    n_tokens, n_trained, n_required = [], [], []
    encoded = encode_canonical(tokenizer, canon, cfg)
    for row in canon["source_row"]:
        enc = encoded.get(row)
        n_tokens.append(len(enc.input_ids) if enc else 0)
        n_trained.append(enc.trained_tokens if enc else 0)
        n_required.append(required_tokens(n_tokens[-1], enc, policy))
    canon["n_tokens"] = pd.Series(n_tokens, dtype="int64")
    canon["n_trained_tokens"] = pd.Series(n_trained, dtype="int64")
    canon["content_key"] = [hashlib.sha256((m or t).encode()).hexdigest() for m, t in zip(canon["messages"], canon["text"])]
    frame = canon.copy()
    frame["n_required_tokens"] = pd.Series(n_required, dtype="int64")
    if not is_text:
        frame["prompt"], frame["completion"] = _summaries(canon)
    else:
        frame["n_tokens"] = frame["n_tokens"].clip(lower=1)  # empty text is reported as empty_text, not as 0 tokens

    lengths = frame.loc[canon["n_tokens"] > 0, "n_tokens"].reset_index(drop=True)
    chooser = choose_length or (lambda ls, requested: choose_max_length(ls, requested, {}, 0, TrainConfig()))
    length = chooser(lengths.tolist(), cfg.max_length)
    n = length.max_length
    print(f"[get_data] {length.describe()}", flush=True)

    kept, report = validate_rows(frame, None if is_text else n, is_text)
    if policy == "fail" and report.dropped.get("too_long"):
        cases = report.failure_cases[report.failure_cases["rule"] == "too_long"]
        raise DataError(
            f"data.overlong is 'fail' and {report.dropped['too_long']} of {report.rows_in} rows in {cfg.source} are "
            f"longer than max_length {n} tokens:\n" + "\n".join(describe_case(r, cfg, n) for r in cases.head(10).itertuples())
            + "\nShorten them, or set data.overlong: drop or truncate_prompt."
        )
    if report.dropped and cfg.on_invalid == "fail":
        head = report.failure_cases.head(10)
        cases = "\n".join(describe_case(r, cfg, n) for r in head.itertuples())
        raise DataError(
            f"data.on_invalid is 'fail' and {report.rows_in - report.rows_kept} of {report.rows_in} rows in "
            f"{cfg.source} break a rule: {report.dropped}\n{cases}\nFix the rows, or set data.on_invalid: drop."
        )
    if len(kept) == 0:
        raise DataError(
            f"data.source: all {report.rows_in} rows of {cfg.source} are invalid: {report.dropped} "
            f"({'; '.join(f'{k}: {RULES.get(k, k)}' for k in report.dropped)}). The validation deck lists each row."
        )
    check_drop_fraction(report, cfg, n, length)
    train, validation, test = split_frame(
        kept, cfg.validation_fraction, effective_test_fraction(cfg), cfg.seed, group_keys(kept, is_text)
    )
    if len(train) < cfg.min_train_rows:
        raise DataError(
            f"only {len(train)} training rows remain from {report.rows_in} in {cfg.source} "
            f"(dropped: {report.dropped or 'none'}; {len(validation)} validation and {len(test)} test rows held out), "
            f"fewer than data.min_train_rows={cfg.min_train_rows}. Add data, fix the dropped rows, or lower "
            "data.test_fraction / data.validation_fraction."
        )
    truncated = 0
    if policy == "truncate_prompt" and not is_text:
        for row in kept["source_row"]:
            if len(encoded[row].input_ids) > n:
                encoded[row] = truncate_prompt(encoded[row], n)
                truncated += 1
    tokens = token_rows(encoded, train["source_row"].tolist(), cfg, is_text, n)
    if tokens.empty:
        raise DataError(
            f"no training tokens carry loss in {cfg.source}: every kept row's completion is empty after "
            "tokenization or truncation. Check the completion column, or raise data.max_length."
        )
    return PreparedData(
        train=train[CANONICAL_COLUMNS].reset_index(drop=True),
        validation=heldout_rows(validation, encoded, n),
        test=heldout_rows(test, encoded, n),
        train_tokens=tokens,
        format=detected.format,
        format_reason=detected.reason,
        report=report,
        length=length,
        lengths=lengths,
        truncated_rows=truncated,
        packing_efficiency=packing_efficiency(tokens["seq_lens"].tolist(), n),
    )

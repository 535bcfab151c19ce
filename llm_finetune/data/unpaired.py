"""Unpaired feedback for KTO: one answer per row, labelled desirable or not (thumbs up / down).

Accepted shape (``data.format: unpaired``, or ``auto`` when ``completion`` and ``label`` exist):
``prompt`` (a string or a message list), ``completion`` (the answer), ``label`` (true / false;
also 1 / 0, yes / no, up / down, good / bad). Map other names with ``data.columns``, e.g.
``{completion: response, label: thumbs_up}``.

Canonical frame, one row per answer: ``prompt`` (JSON message list), ``completion``, ``label``
(bool), ``source_row`` (1-based), ``n_tokens``. Rows breaking a rule (``UNPAIRED_RULES``,
checked by a pandera schema) are dropped and counted, or fail the run (``data.on_invalid``),
as for SFT rows; ``data.max_drop_fraction`` applies. Rows sharing a prompt stay in one split.

Token rows (``prompt_ids``, ``completion_ids``, ``label``) use the same chat or named template
as SFT, so a model tuned here answers in the format it was supervised in. They are in a seeded
shuffled order: KTO estimates its KL term from neighbouring rows of a batch, and TRL reads the
rows in order. The test split holds the desirable held-out answers as SFT rows (``messages``),
which evaluation scores like any SFT test set: the tuned model should answer like them.
"""

from __future__ import annotations

import hashlib
import json
import random

import pandas as pd
import pandera.pandas as pa

from llm_finetune.config import DataConfig
from llm_finetune.data.formats import Detected
from llm_finetune.data.preference import _is_missing, _last_span, _parse, prompt_text
from llm_finetune.data.validation import ValidationReport, apply_schema
from llm_finetune.encoding import encode_many, prompt_and_reference
from llm_finetune.errors import DataError
from llm_finetune.training.packing import mask_first_label

UNPAIRED_RULES = {
    "empty_prompt": "the prompt (user turns before the answer) is empty",
    "empty_completion": "the answer is empty",
    "label_not_boolean": "the label is not true/false (1/0, yes/no, up/down, good/bad)",
    "too_long": "prompt plus answer is longer than data.max_length tokens",
    "duplicate": "exact duplicate of an earlier row (same prompt, answer and label)",
    "conflicting_label": "the same answer to the same prompt is labelled both desirable and undesirable",
}
RULE_COLUMNS = {"empty_prompt": "prompt", "empty_completion": "completion", "label_not_boolean": "label",
                "too_long": "prompt, completion", "duplicate": "prompt, completion, label",
                "conflicting_label": "prompt, completion, label"}
CANONICAL_COLUMNS = ["prompt", "completion", "label", "source_row", "n_tokens"]
TOKEN_COLUMNS = ["prompt_ids", "completion_ids", "label", "source_row"]
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "label")
_TRUE = {"true", "1", "yes", "y", "up", "good", "desirable", "thumbs_up", "+1"}
_FALSE = {"false", "0", "no", "n", "down", "bad", "undesirable", "thumbs_down", "-1"}


def detect_unpaired(columns: list[str], requested: str) -> Detected | None:
    """``Detected('unpaired', why)`` for labelled single answers, None for other data."""
    cols = set(columns)
    if requested == "unpaired":
        missing = [c for c in ("prompt", "completion", "label") if c not in cols]
        if missing:
            raise DataError(
                f"data.format is 'unpaired', which needs columns prompt, completion and label, but {', '.join(missing)} "
                f"missing; the data has: {', '.join(sorted(cols))}. Map your columns with data.columns, "
                f"e.g. columns: {{{missing[0]}: <your column>}}"
            )
        return Detected("unpaired", "format 'unpaired' set in the config")
    if requested == "auto" and {"prompt", "completion", "label"} <= cols:
        return Detected("unpaired", "auto-detected 'unpaired' from columns prompt, completion, label")
    return None


def parse_label(value) -> bool | None:
    """True / False from the spellings feedback data uses; None when it is none of them."""
    if isinstance(value, bool):
        return value
    if _is_missing(value):
        return None
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def canonical_rows(raw: pd.DataFrame) -> pd.DataFrame:
    """The canonical frame plus ``label_ok`` (whether the label parsed) for validation."""
    rows = []
    for i, rec in enumerate(raw.to_dict(orient="records"), start=1):
        prompt = _parse(rec.get("prompt"), i, "prompt")
        # an empty prompt stays one empty user turn: it renders, and the empty_prompt rule reports it by row
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else (prompt or [{"role": "user", "content": ""}])
        completion = rec.get("completion")
        label = parse_label(rec.get("label"))
        rows.append({"prompt": json.dumps(msgs, ensure_ascii=False),
                     "completion": "" if _is_missing(completion) else str(completion),
                     "label": bool(label), "label_ok": label is not None, "source_row": i})
    return pd.DataFrame.from_records(rows, columns=["prompt", "completion", "label", "label_ok", "source_row"])


def encode_rows(tokenizer, frame: pd.DataFrame, data_cfg: DataConfig) -> list[dict]:
    """``{prompt_ids, completion_ids, label, source_row}`` per canonical row, rendered like SFT rows
    (the answer as the last assistant turn, with the end-of-turn/EOS tokens SFT trains)."""
    records = frame.to_dict(orient="records")
    convs = [json.loads(r["prompt"]) + [{"role": "assistant", "content": r["completion"]}] for r in records]
    out = []
    for r, enc in zip(records, encode_many(tokenizer, convs, train_on_prompt=False, template=data_cfg.prompt_template)):
        start, end = _last_span(enc.labels)
        out.append({"prompt_ids": enc.input_ids[:start], "completion_ids": enc.input_ids[start:end],
                    "label": bool(r["label"]), "source_row": int(r["source_row"])})
    return out


def unpaired_examples(tokenizer, frame: pd.DataFrame, data_cfg: DataConfig) -> list[dict]:
    """Token rows as TRL's KTOTrainer takes them, from get_data's token rows or canonical rows."""
    if "prompt_ids" in frame.columns:
        return [{"prompt_ids": [int(x) for x in r["prompt_ids"]], "completion_ids": [int(x) for x in r["completion_ids"]],
                 "label": bool(r["label"])} for r in frame.to_dict(orient="records")]
    if not {"completion", "label"} <= set(frame.columns):
        raise DataError(
            "train.method: kto trains on labelled answers (prompt, completion, label), but the training data has "
            f"columns {', '.join(map(str, frame.columns))}; set data.format: unpaired (or auto) and point data.source at them"
        )
    return [{k: e[k] for k in UNPAIRED_COLUMNS} for e in encode_rows(tokenizer, frame, data_cfg)]


def unpaired_sample_prompts(tokenizer, frame: pd.DataFrame, data_cfg: DataConfig, n: int) -> list[tuple[str, str]]:
    """(generation prompt, desirable answer) for the first ``n`` held-out desirable rows."""
    if "completion" not in frame or "label" not in frame:
        return []
    out = []
    for row in frame[frame["label"].astype(bool)].head(n).to_dict(orient="records"):
        conv = json.loads(row["prompt"]) + [{"role": "assistant", "content": row["completion"]}]
        out.append(prompt_and_reference(tokenizer, conv, data_cfg.prompt_template))
    return out


def schema(max_length: int | None) -> pa.DataFrameSchema:
    non_empty = lambda s: s.str.strip().str.len() > 0  # noqa: E731
    n_tokens = [pa.Check.ge(1)] + ([pa.Check(lambda s: s <= max_length, name="too_long")] if max_length else [])
    return pa.DataFrameSchema(
        {
            "prompt_text": pa.Column(str, pa.Check(non_empty, name="empty_prompt")),
            "completion": pa.Column(str, pa.Check(non_empty, name="empty_completion")),
            "label_ok": pa.Column(bool, pa.Check(lambda s: s, name="label_not_boolean")),
            "n_tokens": pa.Column(int, n_tokens),
            "content_key": pa.Column(str, pa.Check(lambda s: ~s.duplicated(keep="first"), name="duplicate")),
            "answer_key": pa.Column(str, pa.Check(lambda s: ~s.duplicated(keep=False), name="conflicting_label")),
        },
        strict=False,
        coerce=False,
    )


def validate_rows(frame: pd.DataFrame, max_length: int | None) -> tuple[pd.DataFrame, ValidationReport]:
    """Rows passing every rule, and a report (counts per rule, one failure case per broken rule and row)."""
    return apply_schema(frame, schema(max_length), RULE_COLUMNS)


def describe_case(case, cfg: DataConfig, max_length: int) -> str:
    where = f"  row {case.source_row}, column {case.column}: {case.rule} ({UNPAIRED_RULES.get(case.rule, case.rule)})"
    if case.rule == "too_long":
        return f"{where}: {case.value} tokens, data.max_length is {max_length}; raise data.max_length (or leave it at auto)"
    return where


def _test_rows(test: pd.DataFrame, tokenizer, cfg: DataConfig, max_length: int) -> pd.DataFrame:
    """The desirable held-out answers as SFT canonical + token rows, for evaluation's scores."""
    good = test[test["label"]]
    convs = [json.loads(p) + [{"role": "assistant", "content": c}] for p, c in zip(good["prompt"], good["completion"])]
    encs = encode_many(tokenizer, convs, train_on_prompt=False, template=cfg.prompt_template)
    return pd.DataFrame({
        "messages": [json.dumps(c, ensure_ascii=False) for c in convs],
        "text": "",
        "source_row": good["source_row"].to_numpy(),
        "n_tokens": pd.Series([len(e.input_ids) for e in encs], dtype="int64"),
        "n_trained_tokens": pd.Series([e.trained_tokens for e in encs], dtype="int64"),
        "input_ids": [e.input_ids[:max_length] for e in encs],
        "labels": [mask_first_label(e.labels[:max_length]) for e in encs],
        "seq_lens": [[len(e.input_ids[:max_length])] for e in encs],
    })


def prepare_unpaired(raw: pd.DataFrame, cfg: DataConfig, tokenizer, detected: Detected, choose_length=None):
    """get_data's path for labelled answers: the same stages, report and ``PreparedData`` shape as SFT data."""
    from llm_finetune.config import TrainConfig, effective_test_fraction
    from llm_finetune.data.lengths import choose_max_length
    from llm_finetune.data.prepared import PreparedData, check_drop_fraction, split_frame

    frame = canonical_rows(raw)
    encoded = {e["source_row"]: e for e in encode_rows(tokenizer, frame, cfg)}
    frame["n_tokens"] = pd.Series([len(encoded[r]["prompt_ids"]) + len(encoded[r]["completion_ids"])
                                   for r in frame["source_row"]], index=frame.index, dtype="int64")
    frame["prompt_text"] = frame["prompt"].map(prompt_text)
    frame["content_key"] = [hashlib.sha256(json.dumps([p, c, bool(lab)]).encode()).hexdigest()
                            for p, c, lab in zip(frame["prompt"], frame["completion"], frame["label"])]
    frame["answer_key"] = [hashlib.sha256(json.dumps([p, c]).encode()).hexdigest()
                           for p, c in zip(frame["prompt"], frame["completion"])]
    # one answer labelled both ways is a conflict (the same label twice is a duplicate): other rows get a unique key
    both = frame.groupby("answer_key")["label"].nunique()
    alone = ~frame["answer_key"].isin(both[both > 1].index)
    frame.loc[alone, "answer_key"] = "row " + frame.loc[alone, "source_row"].astype(str)
    chooser = choose_length or (lambda ls, requested: choose_max_length(ls, requested, {}, 0, TrainConfig()))
    length = chooser(frame["n_tokens"].tolist(), cfg.max_length)
    max_length = length.max_length
    print(f"[get_data] {length.describe()}", flush=True)
    kept, report = validate_rows(frame, max_length)
    if report.dropped and (cfg.on_invalid == "fail" or (cfg.overlong == "fail" and report.dropped.get("too_long"))):
        cases = "\n".join(describe_case(c, cfg, max_length) for c in report.failure_cases.head(10).itertuples())
        raise DataError(
            f"data.on_invalid / data.overlong is 'fail' and {report.rows_in - report.rows_kept} of {report.rows_in} "
            f"labelled answers in {cfg.source} break a rule: {report.dropped}\n{cases}\nFix the rows, or set "
            "data.on_invalid: drop and data.overlong: drop."
        )
    if len(kept) == 0:
        raise DataError(
            f"data.source: all {report.rows_in} labelled answers of {cfg.source} are invalid: {report.dropped} "
            f"({'; '.join(f'{k}: {UNPAIRED_RULES.get(k, k)}' for k in report.dropped)}). The validation deck lists each row."
        )
    check_drop_fraction(report, cfg, max_length, length, UNPAIRED_RULES, {
        "label_not_boolean": "write the label as true or false", "empty_completion": "fill in the answer",
        "conflicting_label": "keep one label per answer"})
    groups = [hashlib.sha256(t.strip().encode()).hexdigest() for t in kept["prompt_text"]]
    train, validation, test = split_frame(kept, cfg.validation_fraction, effective_test_fraction(cfg), cfg.seed, groups)
    labels = set(train["label"])
    if len(train) < cfg.min_train_rows or len(labels) < 2:
        raise DataError(
            f"{len(train)} training rows remain from {report.rows_in} in {cfg.source} (labels: "
            f"{int(train['label'].sum())} desirable, {int((~train['label']).sum())} undesirable; dropped: "
            f"{report.dropped or 'none'}). KTO needs at least data.min_train_rows={cfg.min_train_rows} rows with both "
            "labels: add rows (desirable and undesirable answers), fix the dropped rows, or lower data.test_fraction / "
            "data.validation_fraction."
        )
    if not test["label"].any():
        raise DataError(f"no desirable answer is among the {len(test)} test rows of {cfg.source}, so the tuned model "
                        "cannot be scored; add desirable rows or raise data.test_fraction")
    order = list(train["source_row"])
    random.Random(cfg.seed).shuffle(order)  # KTO's KL term pairs neighbouring rows; TRL reads them in order
    tokens = pd.DataFrame.from_records([encoded[r] for r in order], columns=TOKEN_COLUMNS)
    return PreparedData(
        train=train[CANONICAL_COLUMNS].reset_index(drop=True),
        validation=validation[CANONICAL_COLUMNS].reset_index(drop=True),
        test=_test_rows(test, tokenizer, cfg, max_length),
        train_tokens=tokens,
        format=detected.format,
        format_reason=detected.reason,
        report=report,
        length=length,
        lengths=frame["n_tokens"].reset_index(drop=True),
        truncated_rows=0,
        packing_efficiency=0.0,
    )

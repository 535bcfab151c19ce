"""Preference pairs for DPO: read, canonicalise, validate (pandera), tokenize and split.

Accepted shapes (``data.format: preference``, or ``auto`` when ``chosen`` and ``rejected`` exist):

- flat: ``prompt``, ``chosen``, ``rejected`` strings;
- chat, explicit prompt (UltraFeedback-binarized): ``prompt`` string or message list, and
  ``chosen`` / ``rejected`` message lists that either repeat the prompt turns or hold
  only the assistant's answer;
- chat, implicit prompt (HH-RLHF as TRL ships it): ``chosen`` / ``rejected`` full
  conversations that share every turn but the last assistant answer;
- Anthropic's raw HH-RLHF strings (``\\n\\nHuman: ... \\n\\nAssistant: ...``).

Canonical frame, one row per pair: ``prompt`` (JSON message list: the context before the
answer), ``chosen`` and ``rejected`` (the two answers), ``source_row`` (1-based), ``n_tokens``
(prompt plus the longer answer). Rows that break a rule (``PREFERENCE_RULES``) are dropped
and counted, or fail the run (``data.on_invalid``), exactly as for SFT data, and more dropped
than ``data.max_drop_fraction`` fails before training. ``data.overlong``: ``drop`` (too_long),
``fail``, or ``truncate_prompt``, which cuts the prompt from the left and keeps both answers
whole with their EOS (a pair whose longer answer alone fills ``max_length`` is dropped and
counted as answers_too_long). Data whose structure is wrong (not a list of messages,
unknown role, last turn not the assistant's) is refused with the row and column named.

Token rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) use the same chat template or
named template as SFT (encoding.py), so a DPO stage after SFT sees prompts rendered exactly
as SFT trained them. They are what TRL's ``DPOTrainer`` consumes.
"""

from __future__ import annotations

import hashlib
import json
import re

import pandas as pd
import pandera.pandas as pa

from llm_finetune.config import DataConfig
from llm_finetune.data.formats import ROLES, Detected
from llm_finetune.data.validation import ValidationReport, apply_schema
from llm_finetune.encoding import IGNORE_INDEX, encode_many, prompt_and_reference
from llm_finetune.errors import DataError

PREFERENCE_RULES = {
    "empty_prompt": "the prompt (user turns before the answers) is empty",
    "empty_chosen": "the chosen answer is empty",
    "empty_rejected": "the rejected answer is empty",
    "chosen_equals_rejected": "chosen and rejected are the same answer, so there is no preference to learn",
    "prompt_not_shared": "chosen and rejected do not continue the same prompt (their earlier turns differ)",
    "too_long": "prompt plus the longer answer is longer than data.max_length tokens",
    "answers_too_long": "the longer answer alone leaves no room for the prompt in data.max_length tokens "
                        "(data.overlong: truncate_prompt keeps answers whole)",
    "duplicate": "exact duplicate of an earlier pair",
}
RULE_COLUMNS = {  # the user's columns each rule is about, for error messages and the failure-case deck
    "empty_prompt": "prompt", "empty_chosen": "chosen", "empty_rejected": "rejected",
    "chosen_equals_rejected": "chosen, rejected", "prompt_not_shared": "prompt, chosen, rejected",
    "too_long": "prompt, chosen, rejected", "answers_too_long": "chosen, rejected", "duplicate": "prompt, chosen, rejected",
}
CANONICAL_COLUMNS = ["prompt", "chosen", "rejected", "source_row", "n_tokens"]
TOKEN_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "source_row"]
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def detect_preference(columns: list[str], requested: str) -> Detected | None:
    """``Detected('preference', why)`` when the data holds preference pairs, None for SFT data."""
    cols = set(columns)
    if requested == "preference":
        missing = [c for c in ("chosen", "rejected") if c not in cols]
        if missing:
            raise DataError(
                f"data.format is 'preference', which needs columns chosen and rejected (and prompt, unless chosen and "
                f"rejected are full conversations), but {', '.join(missing)} missing; the data has: "
                f"{', '.join(sorted(cols))}. Map your columns with data.columns, e.g. columns: {{{missing[0]}: <your column>}}"
            )
        return Detected("preference", "format 'preference' set in the config")
    if requested == "auto" and {"chosen", "rejected"} <= cols:
        used = [c for c in ("prompt", "chosen", "rejected") if c in cols]
        return Detected("preference", f"auto-detected 'preference' from columns {', '.join(used)}")
    return None


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def _messages(value, row: int, column: str) -> list[dict]:
    """A message list from a list, a numpy array (parquet) or a JSON string; errors name row and column."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"row {row}, column {column}, message {i}: expected an object with 'role' and 'content', got {m!r:.80}")
        role = str(m["role"]).strip().lower()
        if role not in ROLES:
            raise DataError(f"row {row}, column {column}, message {i}: unknown role {m['role']!r}; roles must be one of {', '.join(ROLES)}")
        out.append({"role": role, "content": "" if _is_missing(m["content"]) else str(m["content"])})
    return out


def _hh_messages(text: str) -> list[dict]:
    """Anthropic's raw HH-RLHF transcript (``\\n\\nHuman: .. \\n\\nAssistant: ..``) as messages."""
    parts = _HH_TURN.split(text)
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()} for who, body in zip(parts[1::2], parts[2::2])]


def _parse(value, row: int, column: str):
    """A string (an answer or a prompt), or a message list; a JSON list of messages in a string is a list."""
    if _is_missing(value):
        return ""
    if isinstance(value, str):
        stripped = value.lstrip()
        if stripped.startswith("[{"):
            try:
                return _messages(json.loads(stripped), row, column)
            except json.JSONDecodeError:
                return value
        if _HH_TURN.search(value) and column != "prompt":
            return _hh_messages(value)
        return value
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        return _messages(value, row, column)
    raise DataError(
        f"row {row}, column {column}: expected a string or a list of {{role, content}} messages, got {type(value).__name__}"
    )


def _answer(value, row: int, column: str) -> tuple[list[dict] | None, str]:
    """(context turns before the answer or None, the answer) of a chosen/rejected cell."""
    if isinstance(value, str):
        return None, value
    if not value:
        return [], ""
    if value[-1]["role"] != "assistant":
        raise DataError(
            f"row {row}, column {column}: the last message must be the assistant's answer, got role {value[-1]['role']!r}; "
            "chosen and rejected end with the two answers being compared"
        )
    return value[:-1], value[-1]["content"]


def canonical_pairs(raw: pd.DataFrame) -> pd.DataFrame:
    """The canonical frame (see module docstring) plus ``prompt_shared`` for validation."""
    has_prompt = "prompt" in raw.columns
    rows = []
    for i, rec in enumerate(raw.to_dict(orient="records"), start=1):
        chosen_ctx, chosen = _answer(_parse(rec["chosen"], i, "chosen"), i, "chosen")
        rejected_ctx, rejected = _answer(_parse(rec["rejected"], i, "rejected"), i, "rejected")
        prompt = _parse(rec.get("prompt"), i, "prompt") if has_prompt else None
        prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) and prompt else (prompt or [])
        if chosen_ctx is None and rejected_ctx is None and not has_prompt:
            raise DataError(
                f"row {i}, column prompt: missing; chosen and rejected are plain answers, so the data needs a prompt column "
                "(map yours with data.columns, e.g. columns: {prompt: question}), or give chosen/rejected as full conversations"
            )
        contexts = [c for c in (chosen_ctx, rejected_ctx) if c]  # answers given alone continue the prompt column
        context = contexts[0] if contexts else prompt_msgs
        shared = all(c == context for c in contexts) and (not prompt_msgs or context == prompt_msgs)
        rows.append({"prompt": json.dumps(context, ensure_ascii=False), "chosen": chosen, "rejected": rejected,
                     "source_row": i, "prompt_shared": shared})
    return pd.DataFrame.from_records(rows, columns=["prompt", "chosen", "rejected", "source_row", "prompt_shared"])


def _last_span(labels: list[int]) -> tuple[int, int]:
    """[start, end) of the last run of trained labels: the final assistant answer."""
    end = max(i for i, x in enumerate(labels) if x != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def encode_pairs(tokenizer, frame: pd.DataFrame, data_cfg: DataConfig, chunk: int = 1024) -> list[dict]:
    """``{prompt_ids, chosen_ids, rejected_ids, source_row}`` per canonical row, rendered like SFT rows.

    Each answer is encoded as the last assistant turn of the prompt's conversation, with the
    end-of-turn/EOS tokens SFT trains, so the policy is scored on exactly what it generates.
    """
    records = frame.to_dict(orient="records")
    out = []
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        convs = []
        for r in part:
            ctx = json.loads(r["prompt"])
            convs += [ctx + [{"role": "assistant", "content": r["chosen"]}], ctx + [{"role": "assistant", "content": r["rejected"]}]]
        encs = encode_many(tokenizer, convs, train_on_prompt=False, template=data_cfg.prompt_template)
        for r, chosen, rejected in zip(part, encs[0::2], encs[1::2]):
            c0, c1 = _last_span(chosen.labels)
            r0, r1 = _last_span(rejected.labels)
            out.append({"prompt_ids": chosen.input_ids[:c0], "chosen_ids": chosen.input_ids[c0:c1],
                        "rejected_ids": rejected.input_ids[r0:r1], "source_row": int(r["source_row"])})
    return out


PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def pair_examples(tokenizer, frame: pd.DataFrame, data_cfg: DataConfig) -> list[dict]:
    """Tokenized pairs from get_data's token rows, or by encoding canonical preference rows."""
    if "prompt_ids" in frame.columns:
        return [{k: [int(x) for x in r[k]] for k in PAIR_COLUMNS} for r in frame.to_dict(orient="records")]
    if not {"chosen", "rejected"} <= set(frame.columns):
        raise DataError(
            "train.method trains on preference pairs (prompt/chosen/rejected), but the training data has columns "
            f"{', '.join(map(str, frame.columns))}; set data.format: preference (or auto) and point data.source at pairs, "
            "or use train.method: sft for supervised data"
        )
    return [{k: e[k] for k in PAIR_COLUMNS} for e in encode_pairs(tokenizer, frame, data_cfg)]


def pair_sample_prompts(tokenizer, frame: pd.DataFrame, data_cfg: DataConfig, n: int) -> list[tuple[str, str]]:
    """(generation prompt, chosen answer) for the first ``n`` held-out pairs."""
    if "prompt" not in frame or "chosen" not in frame:
        return []
    out = []
    for row in frame.head(n).to_dict(orient="records"):
        conv = json.loads(row["prompt"]) + [{"role": "assistant", "content": row["chosen"]}]
        out.append(prompt_and_reference(tokenizer, conv, data_cfg.prompt_template))
    return out


def schema(max_length: int | None, answer_limit: int | None = None) -> pa.DataFrameSchema:
    """``max_length``: the whole pair must fit (drop / fail); ``answer_limit``: only the answers must, with a
    prompt token to spare (truncate_prompt cuts the prompt from the left and keeps the answers whole)."""
    non_empty = lambda s: s.str.strip().str.len() > 0  # noqa: E731
    n_tokens = [pa.Check.ge(1)] + ([pa.Check(lambda s: s <= max_length, name="too_long")] if max_length else [])
    answers = [pa.Check(lambda s: s < answer_limit, name="answers_too_long")] if answer_limit else []
    return pa.DataFrameSchema(
        {
            "prompt_text": pa.Column(str, pa.Check(non_empty, name="empty_prompt")),
            "chosen": pa.Column(str, pa.Check(non_empty, name="empty_chosen")),
            "rejected": pa.Column(str, pa.Check(non_empty, name="empty_rejected")),
            "answers_differ": pa.Column(bool, pa.Check(lambda s: s, name="chosen_equals_rejected")),
            "prompt_shared": pa.Column(bool, pa.Check(lambda s: s, name="prompt_not_shared")),
            "n_tokens": pa.Column(int, n_tokens),
            "n_answer_tokens": pa.Column(int, answers),
            "content_key": pa.Column(str, pa.Check(lambda s: ~s.duplicated(keep="first"), name="duplicate")),
        },
        strict=False,
        coerce=False,
    )


def validate_pairs(frame: pd.DataFrame, max_length: int | None,
                   answer_limit: int | None = None) -> tuple[pd.DataFrame, ValidationReport]:
    """Rows passing every rule, and a report (counts per rule, one failure case per broken rule and row)."""
    return apply_schema(frame, schema(max_length, answer_limit), RULE_COLUMNS)


def describe_case(case, cfg: DataConfig) -> str:
    where = f"  row {case.source_row}, column {case.column}: {case.rule} ({PREFERENCE_RULES.get(case.rule, case.rule)})"
    if case.rule == "too_long":
        return f"{where}: {case.value} tokens, data.max_length is {cfg.max_length}; raise data.max_length (or leave it at auto) or set data.overlong: truncate_prompt"
    if case.rule == "answers_too_long":
        return f"{where}: the longer answer has {case.value} tokens, data.max_length is {cfg.max_length}; raise data.max_length"
    return where


def prompt_text(prompt_json: str) -> str:
    """The user-visible prompt turns of a canonical ``prompt`` (system and user contents)."""
    return "\n".join(m["content"] for m in json.loads(prompt_json) if m["role"] != "assistant")


def prepare_preference(raw: pd.DataFrame, cfg: DataConfig, tokenizer, detected: Detected, choose_length=None):
    """get_data's preference path: the same stages, report and ``PreparedData`` shape as SFT data.

    ``choose_length(lengths, requested)`` fits ``data.max_length: auto`` to the pairs (prompt plus
    the longer answer), as for SFT rows; the three splits keep pairs sharing a prompt together.
    """
    from llm_finetune.config import TrainConfig, effective_test_fraction, overlong_policy
    from llm_finetune.data.lengths import choose_max_length
    from llm_finetune.data.prepared import PreparedData, check_drop_fraction, split_frame

    canon = canonical_pairs(raw)
    encoded = {e["source_row"]: e for e in encode_pairs(tokenizer, canon, cfg)}
    frame = canon.copy()
    frame["n_tokens"] = [
        len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in (encoded[r] for r in frame["source_row"])
    ]
    frame["n_tokens"] = frame["n_tokens"].astype("int64")
    frame["n_answer_tokens"] = pd.Series([max(len(encoded[r]["chosen_ids"]), len(encoded[r]["rejected_ids"]))
                                          for r in frame["source_row"]], index=frame.index, dtype="int64")
    frame["prompt_text"] = frame["prompt"].map(prompt_text)
    frame["answers_differ"] = frame["chosen"].str.strip() != frame["rejected"].str.strip()
    frame["content_key"] = [
        hashlib.sha256(json.dumps([p, c, r]).encode()).hexdigest() for p, c, r in zip(frame["prompt"], frame["chosen"], frame["rejected"])
    ]
    chooser = choose_length or (lambda ls, requested: choose_max_length(ls, requested, {}, 0, TrainConfig()))
    length = chooser(frame["n_tokens"].tolist(), cfg.max_length)
    max_length = length.max_length
    print(f"[get_data] {length.describe()}", flush=True)
    policy = overlong_policy(cfg)
    truncate = policy == "truncate_prompt"  # the prompt is cut from the left; the answers (and their EOS) stay whole
    kept, report = validate_pairs(frame, None if truncate else max_length, max_length if truncate else None)
    if policy == "fail" and report.dropped.get("too_long"):
        cases = report.failure_cases[report.failure_cases["rule"] == "too_long"]
        raise DataError(
            f"data.overlong is 'fail' and {report.dropped['too_long']} of {report.rows_in} preference pairs in {cfg.source} "
            f"are longer than max_length {max_length} tokens (prompt plus the longer answer):\n"
            + "\n".join(describe_case(c, cfg) for c in cases.head(10).itertuples())
            + "\nShorten them, or set data.overlong: drop or truncate_prompt."
        )
    if report.dropped and cfg.on_invalid == "fail":
        cases = "\n".join(describe_case(c, cfg) for c in report.failure_cases.head(10).itertuples())
        raise DataError(
            f"data.on_invalid is 'fail' and {report.rows_in - report.rows_kept} of {report.rows_in} preference pairs in "
            f"{cfg.source} break a rule: {report.dropped}\n{cases}\nFix the rows, or set data.on_invalid: drop."
        )
    if len(kept) == 0:
        raise DataError(
            f"data.source: all {report.rows_in} preference pairs of {cfg.source} are invalid: {report.dropped} "
            f"({'; '.join(f'{k}: {PREFERENCE_RULES.get(k, k)}' for k in report.dropped)}). The validation deck lists each row."
        )
    check_drop_fraction(report, cfg, max_length, length, PREFERENCE_RULES, {
        "answers_too_long": "raise data.max_length (or leave it at auto), or shorten the answers",
        "chosen_equals_rejected": "remove pairs without a preference", "prompt_not_shared": "pair answers to the same prompt",
        "empty_prompt": "fill in the prompt", "empty_chosen": "fill in the chosen answer",
        "empty_rejected": "fill in the rejected answer"})
    groups = [hashlib.sha256(t.strip().encode()).hexdigest() for t in kept["prompt_text"]]
    train, validation, test = split_frame(kept, cfg.validation_fraction, effective_test_fraction(cfg), cfg.seed, groups)
    if len(train) < cfg.min_train_rows:
        raise DataError(
            f"only {len(train)} training pairs remain from {report.rows_in} in {cfg.source} (dropped: "
            f"{report.dropped or 'none'}; {len(validation)} validation and {len(test)} test pairs held out), fewer than "
            f"data.min_train_rows={cfg.min_train_rows}. Add data, fix the dropped rows, or lower data.test_fraction / "
            "data.validation_fraction."
        )
    truncated, token_rows = 0, []
    for row in train["source_row"]:
        e = dict(encoded[row])
        room = max_length - max(len(e["chosen_ids"]), len(e["rejected_ids"]))  # >= 1: answers_too_long dropped the rest
        if truncate and len(e["prompt_ids"]) > room:
            e["prompt_ids"] = e["prompt_ids"][-room:]  # from the left: the turn just before the answers stays
            truncated += 1
        token_rows.append(e)
    tokens = pd.DataFrame.from_records(token_rows, columns=TOKEN_COLUMNS)
    return PreparedData(
        train=train[CANONICAL_COLUMNS].reset_index(drop=True),
        validation=validation[CANONICAL_COLUMNS].reset_index(drop=True),
        test=test[CANONICAL_COLUMNS].reset_index(drop=True),
        train_tokens=tokens,
        format=detected.format,
        format_reason=detected.reason,
        report=report,
        length=length,
        lengths=frame["n_tokens"].reset_index(drop=True),
        truncated_rows=truncated,
        packing_efficiency=0.0,
    )


def is_preference_frame(frame: pd.DataFrame) -> bool:
    """Canonical or token rows of preference pairs (as opposed to SFT rows)."""
    return {"chosen", "rejected"} <= set(frame.columns) or "chosen_ids" in frame.columns

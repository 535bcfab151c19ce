"""Row-level validation of the canonical frame with pandera.

Each rule is a named pandera check, so a failing row is reported by rule name (the
validation deck and the ``fail`` policy's error both use these names).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import pandera.pandas as pa

RULES = {
    "empty_prompt": "the prompt (instruction / user turns) is empty",
    "empty_completion": "the completion (output / response / assistant turn) is empty",
    "empty_text": "the text is empty",
    "too_long": "longer than max_length tokens (data.max_length; with data.overlong: truncate_prompt, the completion alone)",
    "duplicate": "exact duplicate of an earlier row",
}


def schema(max_length: int | None, is_text: bool) -> pa.DataFrameSchema:
    """Rules per column; ``max_length=None`` means no length limit (text blocks, truncation)."""
    non_empty = lambda s: s.str.strip().str.len() > 0  # noqa: E731
    columns = {
        "source_row": pa.Column(int, nullable=False),
        "n_tokens": pa.Column(int, pa.Check.ge(1), nullable=False),
        "content_key": pa.Column(str, pa.Check(lambda s: ~s.duplicated(keep="first"), name="duplicate"), nullable=False),
    }
    if is_text:
        columns["text"] = pa.Column(str, pa.Check(non_empty, name="empty_text"), nullable=False)
    else:
        columns["prompt"] = pa.Column(str, pa.Check(non_empty, name="empty_prompt"), nullable=False)
        columns["completion"] = pa.Column(str, pa.Check(non_empty, name="empty_completion"), nullable=False)
        if max_length is not None:
            # the tokens that must fit: the whole row, or only the completion when data.overlong is
            # truncate_prompt (prepare.required_tokens)
            columns["n_required_tokens"] = pa.Column(int, pa.Check(lambda s: s <= max_length, name="too_long"), nullable=False)
    return pa.DataFrameSchema(columns, strict=False, coerce=False)


@dataclass
class ValidationReport:
    rows_in: int
    rows_kept: int
    dropped: dict[str, int] = field(default_factory=dict)  # rule -> rows
    failure_cases: pd.DataFrame = field(default_factory=pd.DataFrame)  # source_row, rule, column, value


def validate_rows(frame: pd.DataFrame, max_length: int | None, is_text: bool) -> tuple[pd.DataFrame, ValidationReport]:
    """Return the rows that pass every rule and a report of the ones that do not."""
    try:
        schema(max_length, is_text).validate(frame, lazy=True)
        return frame, ValidationReport(len(frame), len(frame))
    except pa.errors.SchemaErrors as err:
        cases = err.failure_cases
    cases = cases[cases["index"].notna()].copy()
    cases["index"] = cases["index"].astype(int)
    cases["rule"] = cases["check"].astype(str).map(lambda c: c if c in RULES else c)
    bad_index = sorted(set(cases["index"]))
    kept = frame.drop(index=bad_index)
    # A row broken in two ways counts once, under its first rule.
    first_rule = cases.sort_values(["index"]).drop_duplicates("index")
    dropped = first_rule["rule"].value_counts().to_dict()
    table = pd.DataFrame(
        {
            "source_row": frame.loc[cases["index"], "source_row"].to_numpy(),
            "rule": cases["rule"].to_numpy(),
            "column": cases["column"].astype(str).to_numpy(),
            "value": cases["failure_case"].astype(str).str.slice(0, 120).to_numpy(),
        }
    ).sort_values(["source_row", "rule"], kind="stable")
    report = ValidationReport(len(frame), len(kept), {str(k): int(v) for k, v in dropped.items()}, table.reset_index(drop=True))
    return kept, report


def apply_schema(frame: pd.DataFrame, checks: pa.DataFrameSchema,
                 rule_columns: dict[str, str]) -> tuple[pd.DataFrame, ValidationReport]:
    """Rows passing every named check of ``checks``, and a report: counts per rule (a row broken in two ways
    counts once, under its first rule) and one failure case per broken rule and row, naming the user's
    columns each rule is about (``rule_columns``). Shared by preference pairs and unpaired rows."""
    try:
        checks.validate(frame, lazy=True)
        return frame, ValidationReport(len(frame), len(frame))
    except pa.errors.SchemaErrors as err:
        cases = err.failure_cases
    cases = cases[cases["index"].notna()].copy()
    cases["index"] = cases["index"].astype(int)
    cases["rule"] = cases["check"].astype(str)
    kept = frame.drop(index=sorted(set(cases["index"])))
    first = cases.sort_values("index", kind="stable").drop_duplicates("index")
    dropped = {str(k): int(v) for k, v in first["rule"].value_counts().items()}
    table = pd.DataFrame(
        {
            "source_row": frame.loc[cases["index"], "source_row"].to_numpy(),
            "rule": cases["rule"].to_numpy(),
            "column": cases["rule"].map(rule_columns).fillna(cases["column"].astype(str)).to_numpy(),
            "value": cases["failure_case"].astype(str).str.slice(0, 120).to_numpy(),
        }
    ).sort_values(["source_row", "rule"], kind="stable")
    return kept, ValidationReport(len(frame), len(kept), dropped, table.reset_index(drop=True))

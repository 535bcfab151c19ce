"""What SFT rows and preference pairs share once prepared: the ``PreparedData`` record get_data
returns, the deterministic grouped split, and the ``data.max_drop_fraction`` rule.

Below both ``prepare.py`` (SFT) and ``preference.py`` (DPO pairs), so neither imports the other's
internals (tests/test_import_graph.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pandas as pd

from llm_finetune.config import DataConfig
from llm_finetune.data.lengths import LengthChoice
from llm_finetune.data.validation import RULES, ValidationReport
from llm_finetune.errors import DataError

DROP_NOTE_FRACTION = 0.01  # more dropped than this: the run summary says so at its top

FIXES = {
    "too_long": "set data.max_length: auto (the default) or a larger value, or data.overlong: truncate_prompt",
    "duplicate": "remove the repeated rows from the source",
    "empty_prompt": "fill or remove rows without an instruction / user turn",
    "empty_completion": "fill or remove rows without an answer",
    "empty_text": "remove empty text rows",
}


@dataclass
class PreparedData:
    train: pd.DataFrame  # canonical rows (CANONICAL_COLUMNS)
    validation: pd.DataFrame  # canonical + token rows (HELDOUT_COLUMNS): checkpoint choice, early stopping
    test: pd.DataFrame  # canonical + token rows (HELDOUT_COLUMNS): base vs tuned scores only
    train_tokens: pd.DataFrame  # model-ready rows (TOKEN_COLUMNS), packed when data.packing
    format: str
    format_reason: str
    report: ValidationReport
    length: LengthChoice  # the max_length used, why, and what it costs
    lengths: pd.Series = None  # tokens per non-empty row as read, before validation and truncation
    truncated_rows: int = 0  # rows whose prompt was cut from the left (data.overlong: truncate_prompt)
    packing_efficiency: float = 0.0  # real tokens / (rows * max_length) of train_tokens

    @property
    def max_length(self) -> int:
        return self.length.max_length

    @property
    def dropped_fraction(self) -> float:
        r = self.report
        return (r.rows_in - r.rows_kept) / r.rows_in if r.rows_in else 0.0

    def drop_note(self) -> str:
        """One line for the top of the run summary when more than 1% of the rows were dropped; else empty."""
        if self.dropped_fraction <= DROP_NOTE_FRACTION:
            return ""
        r = self.report
        rules = ", ".join(f"{k} {v}" for k, v in sorted(r.dropped.items()))
        return (
            f"{r.rows_in - r.rows_kept} of {r.rows_in} rows ({self.dropped_fraction:.1%}) were dropped ({rules}) "
            f"at max_length {self.max_length}; the get_data deck lists them"
        )


def split_frame(
    frame: pd.DataFrame, validation_fraction: float, test_fraction: float, seed: int, groups: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Deterministic train / validation / test split of whole groups.

    Groups are ordered by a seeded hash of their key (not by position), then dealt to test
    until it holds ``test_fraction`` of the rows, then to validation, the rest to train.
    """
    n = len(frame)
    sizes = pd.Series(groups).value_counts(sort=False)
    order = sorted(sizes.index, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    want = {"test": max(1, round(test_fraction * n)), "validation": max(1, round(validation_fraction * n))}
    where, filled, target = {}, {"test": 0, "validation": 0}, iter(["test", "validation", "train"])
    current = next(target)
    for g in order:
        while current != "train" and filled[current] >= want[current]:
            current = next(target)
        where[g] = current
        if current != "train":
            filled[current] += int(sizes[g])
    part = pd.Series([where[g] for g in groups], index=frame.index)
    pick = lambda name: frame[part == name].sort_values("source_row")  # noqa: E731
    return pick("train"), pick("validation"), pick("test")


def describe_case(case, cfg: DataConfig, max_length: int) -> str:
    where = f"  row {case.source_row}: {case.rule} ({RULES.get(case.rule, case.rule)})"
    if case.rule == "too_long":
        return f"{where}: {case.value} tokens, max_length is {max_length}; {FIXES['too_long']}, or shorten the row"
    return f"{where} in column {case.column}"


def check_drop_fraction(report: ValidationReport, cfg: DataConfig, max_length: int, length: LengthChoice | None = None,
                        rules: dict[str, str] | None = None, extra_fixes: dict[str, str] | None = None) -> None:
    """Fail before training when more rows than ``data.max_drop_fraction`` are dropped, naming each rule.

    ``rules`` / ``extra_fixes``: descriptions and fixes of another data kind's rules (preference pairs)."""
    dropped = report.rows_in - report.rows_kept
    if not report.rows_in or dropped / report.rows_in <= cfg.max_drop_fraction:
        return
    described = {**RULES, **(rules or {})}
    fixes = {**FIXES, **(extra_fixes or {})}
    if length is not None and length.limited_by == "memory":
        fixes["too_long"] = (
            f"max_length was capped at {max_length} by the memory estimate ({length.device}, "
            f"train.per_device_batch_size {length.batch_size}); raise train.memory or use GPUs, lower "
            "train.per_device_batch_size, set train.gradient_checkpointing: true, or set data.overlong: truncate_prompt"
        )
    rules = "\n".join(
        f"  {rule}: {count} rows ({described.get(rule, rule)}); fix: {fixes.get(rule, 'see the validation deck')}"
        for rule, count in sorted(report.dropped.items(), key=lambda kv: -kv[1])
    )
    raise DataError(
        f"data.max_drop_fraction: {dropped} of {report.rows_in} rows of {cfg.source} ({dropped / report.rows_in:.1%}) "
        f"would be dropped, more than the {cfg.max_drop_fraction:.0%} allowed (max_length {max_length}):\n{rules}\n"
        "Fix the rows, or raise data.max_drop_fraction to accept the loss."
    )

"""get_data's decks for preference data (pairs for DPO/ORPO, labelled answers for KTO): the same validation
page as SFT data, a profile, sample rows."""

from __future__ import annotations

import html

import pandas as pd

from llm_finetune.config import overlong_policy, DataConfig
from llm_finetune.data.preference import PREFERENCE_RULES, prompt_text
from llm_finetune.data.unpaired import UNPAIRED_RULES
from tasks.common import length_histogram, table_html

PROMPT_CUT = ("the prompt and the longer answer exceed data.max_length: the prompt was cut from the left (its last turn "
              "kept), both answers kept whole with their EOS (data.overlong: truncate_prompt; training pairs)")


def preference_decks(prepared, data: DataConfig) -> dict[str, str]:
    r = prepared.report
    reasons = [{"reason": k, "meaning": PREFERENCE_RULES.get(k, k), "pairs dropped": v, "pairs cut": 0}
               for k, v in sorted(r.dropped.items())]
    if prepared.truncated_rows:  # kept, but not as written: the user should see how many and why
        reasons.append({"reason": "prompt_cut", "meaning": PROMPT_CUT, "pairs dropped": 0, "pairs cut": prepared.truncated_rows})
    rules = pd.DataFrame(reasons, columns=["reason", "meaning", "pairs dropped", "pairs cut"])
    validation = (
        f"<p>Source <code>{html.escape(data.source)}</code>: {html.escape(prepared.format_reason)} (chosen/rejected pairs "
        f"for DPO).</p><p>Pairs in: <b>{r.rows_in}</b>, kept: <b>{r.rows_kept}</b>, dropped: <b>{r.rows_in - r.rows_kept}</b> "
        f"(policy <code>{data.on_invalid}</code>); cut: <b>{prepared.truncated_rows}</b>.</p>{table_html(rules)}"
        f"<h3>Failure cases</h3>{table_html(r.failure_cases) if len(r.failure_cases) else '<p>none</p>'}"
    )
    tokens = prepared.train_tokens
    profile = (
        f"<p>Format: <b>preference</b>; train pairs {len(prepared.train)}, validation pairs {len(prepared.validation)}, "
        f"test pairs {len(prepared.test)}; max_length {prepared.max_length} tokens (prompt + the longer answer); pairs truncated: {prepared.truncated_rows}.</p>"
        f"<p>Tokens per pair (train): prompt mean {tokens['prompt_ids'].map(len).mean():.1f}, chosen mean "
        f"{tokens['chosen_ids'].map(len).mean():.1f}, rejected mean {tokens['rejected_ids'].map(len).mean():.1f}.</p>"
        + length_histogram(prepared.lengths, prepared.max_length, overlong_policy(data) == "truncate_prompt")
    )
    sample = prepared.train.head(10).assign(prompt=lambda f: f["prompt"].map(prompt_text))
    return {
        "Validation": validation,
        "Data profile": profile,
        "Sample pairs": table_html(sample[["source_row", "prompt", "chosen", "rejected"]], max_rows=10),
    }


def unpaired_decks(prepared, data: DataConfig) -> dict[str, str]:
    """Labelled single answers (KTO): rows dropped per rule, the label balance per split, sample rows."""
    r = prepared.report
    rules = pd.DataFrame([{"reason": k, "meaning": UNPAIRED_RULES.get(k, k), "rows dropped": v} for k, v in sorted(r.dropped.items())],
                         columns=["reason", "meaning", "rows dropped"])
    validation = (
        f"<p>Source <code>{html.escape(data.source)}</code>: {html.escape(prepared.format_reason)} (answers labelled "
        f"desirable or not, for KTO).</p><p>Rows in: <b>{r.rows_in}</b>, kept: <b>{r.rows_kept}</b>, dropped: "
        f"<b>{r.rows_in - r.rows_kept}</b> (policy <code>{data.on_invalid}</code>).</p>{table_html(rules)}"
        f"<h3>Failure cases</h3>{table_html(r.failure_cases) if len(r.failure_cases) else '<p>none</p>'}"
    )
    train, tokens = prepared.train, prepared.train_tokens
    good = int(train["label"].sum())
    profile = (
        f"<p>Format: <b>unpaired</b>; train rows {len(train)} ({good} desirable, {len(train) - good} undesirable), "
        f"validation rows {len(prepared.validation)}, test rows scored {len(prepared.test)} (the desirable held-out "
        f"answers); max_length {prepared.max_length} tokens (prompt + answer).</p>"
        f"<p>Tokens per row (train): prompt mean {tokens['prompt_ids'].map(len).mean():.1f}, answer mean "
        f"{tokens['completion_ids'].map(len).mean():.1f}.</p>"
        + length_histogram(prepared.lengths, prepared.max_length, False)
    )
    sample = train.head(10).assign(prompt=lambda f: f["prompt"].map(prompt_text))
    return {
        "Validation": validation,
        "Data profile": profile,
        "Sample rows": table_html(sample[["source_row", "prompt", "completion", "label"]], max_rows=10),
    }

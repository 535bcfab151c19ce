"""get_data: load, validate (pandera), format and split the training data, with decks."""

import html
import typing

import pandas as pd
from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

from images.specs import cpu_image
from llm_finetune.config import DataConfig
from llm_finetune.data.prepare import PreparedData, prepare
from llm_finetune.data.validation import RULES
from llm_finetune.encoding import IGNORE_INDEX, encode_row
from llm_finetune.model import load_tokenizer
from tasks.common import CACHE_DATA, HF_TOKEN_ENV_SECRET, publish_deck, recoverable, table_html


class DataSplits(typing.NamedTuple):
    """get_data's outputs, each its own Flyte output (not one dataclass): downstream tasks bind
    to ``splits.train_tokens`` as an output reference, which propeller passes on byte for byte,
    where a dataclass field would be an attribute path it re-encodes (see tasks/validate.py)."""

    train: StructuredDataset  # canonical rows (messages/text), for decks and inspection
    train_tokens: StructuredDataset  # model-ready rows: input_ids, labels, seq_lens (packed when data.packing)
    heldout: StructuredDataset  # not "eval": that name is taken by flytekit Promise.eval()
    format: str
    train_rows: int
    eval_rows: int
    dropped_rows: int
    truncated_rows: int
    token_rows: int  # rows of train_tokens (fewer than train_rows when packed)


def _length_histogram(lengths: pd.Series, max_length: int, truncation: bool) -> str:
    """Tokens per example before and after the max_length limit (truncation or dropping)."""
    import plotly.graph_objects as go

    after = lengths.clip(upper=max_length) if truncation else lengths[lengths <= max_length]
    fig = go.Figure()
    fig.add_trace(go.Histogram(x=lengths, name="before", opacity=0.6, nbinsx=40))
    fig.add_trace(go.Histogram(x=after, name="after " + ("truncation" if truncation else "dropping too long"), opacity=0.6, nbinsx=40))
    fig.add_vline(x=max_length, line_dash="dash", annotation_text=f"max_length {max_length}")
    fig.update_layout(barmode="overlay", height=340, title="Tokens per example", xaxis_title="tokens", yaxis_title="examples")
    return fig.to_html(full_html=False, include_plotlyjs=True)


def _highlighted(tokenizer, row: dict, data: DataConfig) -> str:
    enc = encode_row(tokenizer, row, train_on_prompt=data.train_on_prompt, template=data.prompt_template)
    spans = []
    for tok, label in zip(enc.input_ids, enc.labels):
        cls = "trained" if label != IGNORE_INDEX else "prompt"
        spans.append(f"<span class='{cls}'>{html.escape(tokenizer.decode([tok]))}</span>")
    return "<pre style='white-space:pre-wrap'>" + "".join(spans) + "</pre>"


def _decks(prepared: PreparedData, tokenizer, data: DataConfig) -> dict[str, str]:
    r = prepared.report
    rules = pd.DataFrame(
        [{"rule": k, "meaning": RULES.get(k, k), "rows dropped": v} for k, v in sorted(r.dropped.items())],
        columns=["rule", "meaning", "rows dropped"],
    )
    validation = (
        f"<p>Source <code>{html.escape(data.source)}</code>: {prepared.format_reason}.</p>"
        f"<p>Rows in: <b>{r.rows_in}</b>, kept: <b>{r.rows_kept}</b>, dropped: <b>{r.rows_in - r.rows_kept}</b> "
        f"(policy <code>{data.on_invalid}</code>).</p>{table_html(rules)}"
        f"<h3>Failure cases</h3>{table_html(r.failure_cases) if len(r.failure_cases) else '<p>none</p>'}"
    )
    both = pd.concat([prepared.train, prepared.eval])
    tokens = prepared.train_tokens
    packing = (
        f"packed into <b>{len(tokens)}</b> rows of at most {data.max_length} tokens, "
        f"{prepared.packing_efficiency:.1%} of the token slots hold real tokens (block-diagonal attention, no cross-talk)"
        if data.packing
        else f"not packed: {len(tokens)} rows, one example each, padded per batch"
    )
    profile = (
        f"<p>Format: <b>{prepared.format}</b>; train rows {len(prepared.train)}, eval rows {len(prepared.eval)}; "
        f"max_length {data.max_length} tokens; loss on {'all tokens' if data.train_on_prompt else 'completions only'}.</p>"
        f"<p>Tokens per example (all rows read, before validation): mean {both['n_tokens'].mean():.1f}, "
        f"max {both['n_tokens'].max()}; trained tokens per example: mean {both['n_trained_tokens'].mean():.1f}; "
        f"rows truncated: {prepared.truncated_rows}.</p><p>Training rows: {packing}.</p>"
        + _length_histogram(prepared.lengths, data.max_length, data.truncation)
    )
    samples = "".join(
        _highlighted(tokenizer, row, data) for row in prepared.train.head(5).to_dict(orient="records")
    )
    legend = "<p><span class='trained'>green</span> tokens carry loss; grey tokens are prompt (label -100).</p>"
    return {"Validation": validation, "Data profile": profile, "Sample prompts": legend + samples}


@task(
    container_image=cpu_image,
    cache=CACHE_DATA,
    retries=2,
    secret_requests=[HF_TOKEN_ENV_SECRET],
    requests=Resources(cpu="2", mem="8Gi"),
    enable_deck=True,
)
@recoverable()
def get_data(data: DataConfig, base_model: FlyteDirectory) -> DataSplits:
    """Validated, deterministic train/eval splits as parquet, plus validation/profile/sample decks."""
    tokenizer = load_tokenizer(base_model.download())
    prepared = prepare(data, tokenizer)
    publish_deck("get_data", _decks(prepared, tokenizer, data))
    return DataSplits(
        train=StructuredDataset(dataframe=prepared.train),
        train_tokens=StructuredDataset(dataframe=prepared.train_tokens),
        heldout=StructuredDataset(dataframe=prepared.eval),
        format=prepared.format,
        train_rows=len(prepared.train),
        eval_rows=len(prepared.eval),
        dropped_rows=prepared.report.rows_in - prepared.report.rows_kept,
        truncated_rows=prepared.truncated_rows,
        token_rows=len(prepared.train_tokens),
    )

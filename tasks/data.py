"""get_data: load, validate (pandera), format and split the training data, with decks."""

import html
from dataclasses import dataclass

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
from tasks.common import CACHE_DATA, HF_TOKEN_ENV_SECRET, publish_deck, table_html


@dataclass
class DataSplits:
    train: StructuredDataset
    heldout: StructuredDataset  # not "eval": that name is taken by flytekit Promise.eval()
    format: str
    train_rows: int
    eval_rows: int
    dropped_rows: int


def _histogram(values: pd.Series, title: str) -> str:
    import plotly.express as px

    fig = px.histogram(values, nbins=40, title=title, labels={"value": "tokens"})
    fig.update_layout(showlegend=False, height=320)
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
    profile = (
        f"<p>Format: <b>{prepared.format}</b>; train rows {len(prepared.train)}, eval rows {len(prepared.eval)}; "
        f"max_length {data.max_length} tokens; loss on {'all tokens' if data.train_on_prompt else 'completions only'}.</p>"
        f"<p>Tokens per example: mean {both['n_tokens'].mean():.1f}, max {both['n_tokens'].max()}; "
        f"trained tokens per example: mean {both['n_trained_tokens'].mean():.1f}.</p>"
        + _histogram(both["n_tokens"], "Tokens per example")
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
def get_data(data: DataConfig, base_model: FlyteDirectory) -> DataSplits:
    """Validated, deterministic train/eval splits as parquet, plus validation/profile/sample decks."""
    tokenizer = load_tokenizer(base_model.download())
    prepared = prepare(data, tokenizer)
    publish_deck("get_data", _decks(prepared, tokenizer, data))
    return DataSplits(
        train=StructuredDataset(dataframe=prepared.train),
        heldout=StructuredDataset(dataframe=prepared.eval),
        format=prepared.format,
        train_rows=len(prepared.train),
        eval_rows=len(prepared.eval),
        dropped_rows=prepared.report.rows_in - prepared.report.rows_kept,
    )

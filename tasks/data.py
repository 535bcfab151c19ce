"""get_data: load, validate (pandera), fit the length, format and split the data three ways, with decks."""

import html
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from flytekit import Cache, Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

from images.specs import cpu_image
from llm_finetune.config import DataConfig, TrainConfig, TrainOps, deepspeed_config_path, join_train, overlong_policy
from llm_finetune.data.lengths import BatchPlan, choose_max_length
from llm_finetune.data.prepare import PreparedData, prepare
from llm_finetune.data.validation import RULES
from llm_finetune.encoding import IGNORE_INDEX, encode_row
from llm_finetune.model import load_tokenizer
from llm_finetune.training.fit import deepspeed_offload
from llm_finetune.methods import method_spec
from tasks.common import CACHE_DATA, DEEPSPEED_DIR, HF_TOKEN_ENV_SECRET, length_histogram, publish_deck, recoverable, table_html
from tasks.model_files import model_metadata


@dataclass
class DataReport:
    """The data facts the run summary reports: counts, the length used and why, dropped rows."""

    rows_in: int
    train_rows: int
    validation_rows: int
    test_rows: int
    dropped_rows: int
    truncated_rows: int
    max_length: int  # the length used (data.max_length, or fitted when auto)
    length_note: str  # how max_length was chosen and what it costs
    drop_note: str  # non-empty when more than 1% of the rows were dropped: the summary leads with it
    batch_note: str = ""  # how the micro-batch was fitted to keep the rows (empty: as configured)
from tasks.preference_data import preference_decks, unpaired_decks


class DataSplits(typing.NamedTuple):
    """get_data's outputs, each its own Flyte output (not one dataclass): downstream tasks bind
    to ``splits.train_tokens`` as an output reference, which propeller passes on byte for byte,
    where a dataclass field would be an attribute path it re-encodes (see tasks/validate.py)."""

    train: StructuredDataset  # canonical rows (messages/text), for decks and inspection
    train_tokens: StructuredDataset  # model-ready rows: input_ids, labels, seq_lens (packed when data.packing)
    validation: StructuredDataset  # canonical + token rows: checkpoint choice and early stopping, never scored
    test: StructuredDataset  # canonical + token rows: base vs tuned scores, seen by nothing else
    format: str
    train_rows: int
    validation_rows: int
    test_rows: int
    dropped_rows: int
    truncated_rows: int
    token_rows: int  # rows of train_tokens (fewer than train_rows when packed)
    report: DataReport  # what the run summary says about the data (one output, passed whole)
    batch: BatchPlan  # micro-batch / accumulation / checkpointing that hold max_length (applied by train_model)


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
    note = prepared.drop_note()
    validation = (
        (f"<p style='color:#b00'><b>{html.escape(note)}</b></p>" if note else "")
        + f"<p>Source <code>{html.escape(data.source)}</code>: {prepared.format_reason}.</p>"
        f"<p>Rows in: <b>{r.rows_in}</b>, kept: <b>{r.rows_kept}</b>, dropped: <b>{r.rows_in - r.rows_kept}</b> "
        f"(policy <code>{data.on_invalid}</code>).</p>{table_html(rules)}"
        f"<h3>Failure cases</h3>{table_html(r.failure_cases) if len(r.failure_cases) else '<p>none</p>'}"
    )
    both = pd.concat([prepared.train, prepared.validation, prepared.test])
    tokens = prepared.train_tokens
    n = prepared.max_length
    packing = (
        f"packed into <b>{len(tokens)}</b> rows of at most {n} tokens, "
        f"{prepared.packing_efficiency:.1%} of the token slots hold real tokens (block-diagonal attention, no cross-talk)"
        if data.packing
        else f"not packed: {len(tokens)} rows, one example each, padded per batch"
    )
    profile = (
        f"<p><b>{html.escape(prepared.length.describe())}</b>.</p>"
        f"<p>Format: <b>{prepared.format}</b>; rows: train {len(prepared.train)}, validation {len(prepared.validation)} "
        f"(checkpoint choice, early stopping), test {len(prepared.test)} (base vs tuned scores only); split by seed "
        f"{data.seed}, rows sharing a prompt kept in one split. Loss on "
        f"{'all tokens' if data.train_on_prompt else 'completions only'}.</p>"
        f"<p>Tokens per example (all rows read, before validation): median {prepared.lengths.median():.0f}, "
        f"99th percentile {prepared.lengths.quantile(0.99):.0f}, max {prepared.lengths.max()}; trained tokens per "
        f"kept example: mean {both['n_trained_tokens'].mean():.1f}; rows whose prompt was cut from the left "
        f"(data.overlong: truncate_prompt): {prepared.truncated_rows}.</p><p>Training rows: {packing}.</p>"
        + length_histogram(prepared.lengths, n, overlong_policy(data) == "truncate_prompt")
    )
    samples = "".join(
        _highlighted(tokenizer, row, data) for row in prepared.train.head(5).to_dict(orient="records")
    )
    legend = "<p><span class='trained'>green</span> tokens carry loss; grey tokens are prompt (label -100).</p>"
    return {"Validation": validation, "Data profile": profile, "Sample prompts": legend + samples}


# like the training task: operational keys (memory, accelerator, ...) stay out of the cache key
CACHE_DATA_IGNORING_OPS = Cache(version=CACHE_DATA.version, ignored_inputs=("train_ops",))


def length_chooser(model_dir: Path, n_params: int, train: TrainConfig):
    """``prepare``'s length fitting with this model's context and size and the configured hardware."""
    model_config = json.loads((model_dir / "config.json").read_text())
    ds = deepspeed_config_path(train.deepspeed, DEEPSPEED_DIR)
    zero = json.loads(ds.read_text()).get("zero_optimization", {}).get("stage", 0) if ds and ds.is_file() else 0
    offload = deepspeed_offload(ds) if ds and ds.is_file() else False
    if train.sharding == "fsdp2":  # shards weights, gradients and optimizer states like ZeRO-3
        zero, offload = 3, train.fsdp.cpu_offload

    def choose(lengths, requested):
        return choose_max_length(lengths, requested, model_config, n_params, train, int(zero), offload)

    return choose


@task(
    container_image=cpu_image,
    cache=CACHE_DATA_IGNORING_OPS,
    retries=2,
    secret_requests=[HF_TOKEN_ENV_SECRET],
    requests=Resources(cpu="2", mem="8Gi"),
    enable_deck=True,
)
@recoverable()
def get_data(
    data: DataConfig, base_model: FlyteDirectory, train: TrainConfig = TrainConfig(), train_ops: TrainOps = TrainOps()
) -> DataSplits:
    """Validated, deterministic train/validation/test splits as parquet, plus validation/profile/sample decks.

    ``train`` and ``train_ops`` size ``data.max_length: auto`` to the training hardware (batch size,
    method, GPUs; memory, accelerator, gradient checkpointing). ``train_ops`` is left out of the
    cache key like the training task's: changing only train.memory reuses the cached data and the
    length fitted before (set data.max_length, or clear the cache, to fit it again).
    """
    model_dir, n_params = model_metadata(base_model)  # config and tokenizer; the weights stay in the store
    tokenizer = load_tokenizer(model_dir)
    prepared = prepare(data, tokenizer, length_chooser(model_dir, n_params, join_train(train, train_ops)),
                       kind=method_spec(train.method).data)
    if prepared.length.plan.note:
        print(f"[get_data] batch fitted to keep the rows: {prepared.length.plan.note}", flush=True)
    note = prepared.drop_note()
    if note:
        print(f"[get_data] WARNING: {note}", flush=True)
    decks_of = {"preference": preference_decks, "unpaired": unpaired_decks}.get(prepared.format)  # by the rows' shape
    decks = decks_of(prepared, data) if decks_of else _decks(prepared, tokenizer, data)
    publish_deck("get_data", decks)
    return DataSplits(
        train=StructuredDataset(dataframe=prepared.train),
        train_tokens=StructuredDataset(dataframe=prepared.train_tokens),
        validation=StructuredDataset(dataframe=prepared.validation),
        test=StructuredDataset(dataframe=prepared.test),
        format=prepared.format,
        train_rows=len(prepared.train),
        validation_rows=len(prepared.validation),
        test_rows=len(prepared.test),
        dropped_rows=prepared.report.rows_in - prepared.report.rows_kept,
        truncated_rows=prepared.truncated_rows,
        token_rows=len(prepared.train_tokens),
        report=DataReport(
            rows_in=prepared.report.rows_in,
            train_rows=len(prepared.train),
            validation_rows=len(prepared.validation),
            test_rows=len(prepared.test),
            dropped_rows=prepared.report.rows_in - prepared.report.rows_kept,
            truncated_rows=prepared.truncated_rows,
            max_length=prepared.max_length,
            length_note=prepared.length.describe(),
            drop_note=note,
            batch_note=prepared.length.plan.note,
        ),
        batch=prepared.length.plan,
    )

"""evaluate: score base, tuned and quantized models on the test split, with decks."""

import html
from dataclasses import dataclass, field

import pandas as pd
from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

from images.specs import cpu_image
from llm_finetune.evaluation.benchmarks import run_benchmarks
from llm_finetune.config import DataConfig, EvalConfig, TrainConfig
from llm_finetune.cpus import use_container_cpus
from llm_finetune.evaluation.evaluate import EvalMetrics
from llm_finetune.evaluation.evaluate import evaluate as score_model
from llm_finetune.evaluation.report import metric_cell, metrics_html, table_html, task_metrics_table, variants_table  # noqa: F401 - re-exported
from tasks.common import CACHE_EVAL, publish_deck, recoverable
from tasks.quantize import QuantizedModel


@dataclass
class EvalReport:
    metrics: EvalMetrics
    samples: StructuredDataset  # prompt, reference, prediction, correct (one row per scored held-out row)
    benchmarks: dict[str, float] = field(default_factory=dict)  # lm-eval-harness zero-shot accuracy per task


@dataclass
class VariantMetrics:
    """One quantized variant against the unquantized tuned model (delta = variant - tuned)."""

    variant: str
    size_mb: float
    metrics: EvalMetrics
    loss_delta: float
    perplexity_delta: float
    exact_match_delta: float
    agreement: float  # share of rows where the variant's greedy answer equals the tuned model's


def eval_resources(train: TrainConfig) -> Resources:
    """One GPU when training used GPUs (inference needs no more), CPU otherwise; never the training node's size."""
    if train.gpus_per_node > 0:
        return Resources(cpu="4", mem="32Gi", gpu=1)
    return Resources(cpu="2", mem="8Gi")


@task(container_image=cpu_image, cache=CACHE_EVAL, retries=1, requests=Resources(cpu="2", mem="8Gi"), enable_deck=True)
@recoverable()
def evaluate_model(
    model: FlyteDirectory, eval_data: StructuredDataset, data: DataConfig, evaluate: EvalConfig, label: str
) -> EvalReport:
    """Loss, perplexity and the task metric of ``model`` (plus optional lm-eval benchmarks); ``label`` names it in decks."""
    model_dir = model.download()
    use_container_cpus()
    metrics, table = score_model(model_dir, eval_data.open(pd.DataFrame).all(), data, evaluate)
    benchmarks = run_benchmarks(model_dir, evaluate)
    bench = "".join(f"<li>{html.escape(k)}: {v:.3f}</li>" for k, v in benchmarks.items())
    publish_deck(
        f"evaluate_{label}",
        {
            f"{label} metrics": metrics_html(label, metrics) + (f"<p>Zero-shot benchmarks:</p><ul>{bench}</ul>" if bench else ""),
            f"{label} generations": table_html(table, max_rows=100),
        },
    )
    return EvalReport(metrics=metrics, samples=StructuredDataset(dataframe=table), benchmarks=benchmarks)


def _delta_row(q: QuantizedModel, m: EvalMetrics, tuned: EvalMetrics, agreement: float) -> VariantMetrics:
    return VariantMetrics(
        variant=q.variant,
        size_mb=q.size_mb,
        metrics=m,
        loss_delta=m.loss - tuned.loss,
        perplexity_delta=m.perplexity - tuned.perplexity,
        exact_match_delta=m.exact_match - tuned.exact_match,
        agreement=agreement,
    )


@task(container_image=cpu_image, cache=CACHE_EVAL, retries=1, requests=Resources(cpu="2", mem="8Gi"), enable_deck=True)
@recoverable()
def evaluate_quantized(
    quantized: list[QuantizedModel], eval_data: StructuredDataset, data: DataConfig, evaluate: EvalConfig,
    tuned: EvalReport, tuned_mb: float,
) -> list[VariantMetrics]:
    """Every quantized variant on the same test rows, with its change against the unquantized tuned model."""
    if not quantized:
        return []
    use_container_cpus()
    frame = eval_data.open(pd.DataFrame).all()
    tuned_table = tuned.samples.open(pd.DataFrame).all()
    rows, samples = [], {"prompt": tuned_table["prompt"], "tuned": tuned_table["prediction"]}
    for q in quantized:
        metrics, table = score_model(q.model.download(), frame, data, evaluate, gguf_file=q.gguf_file)
        same = (table["prediction"].reset_index(drop=True) == tuned_table["prediction"].reset_index(drop=True))
        rows.append(_delta_row(q, metrics, tuned.metrics, float(same.mean()) if len(same) else 0.0))
        samples[q.variant] = table["prediction"]
        print(f"[evaluate_quantized] {q.variant}: loss {metrics.loss:.4f} ({metrics.loss - tuned.metrics.loss:+.4f}), "
              f"exact match {metrics.exact_match:.1%} ({metrics.exact_match - tuned.metrics.exact_match:+.1%})", flush=True)
    publish_deck(
        "evaluate_quantized",
        {
            "Quantized vs tuned": table_html(variants_table(rows, tuned.metrics, tuned_mb), max_rows=20)
            + table_html(task_metrics_table([("tuned", tuned.metrics)] + [(r.variant, r.metrics) for r in rows])),
            "Quantized generations": table_html(pd.DataFrame(samples), max_rows=50),
        },
    )
    return rows

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
from tasks.common import CACHE_EVAL, publish_deck, table_html, recoverable
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


def metric_cell(m: EvalMetrics, name: str) -> str:
    """``97.0% [93.0, 99.0]``: the score and its bootstrap 95% interval."""
    if name not in m.scores:
        return ""
    return f"{m.scores[name]:.1%} [{m.scores_low[name]:.1%}, {m.scores_high[name]:.1%}]"


def task_metrics_table(models: list[tuple[str, EvalMetrics]]) -> pd.DataFrame:
    """One row per model (base, tuned, each quantized variant), one column per task metric with its interval."""
    names = list(dict.fromkeys(k for _, m in models for k in m.scores))
    return pd.DataFrame(
        [{"model": label, "test rows": m.exact_match_rows, **{n: metric_cell(m, n) for n in names},
          "loss": f"{m.loss:.4f}", "perplexity": f"{m.perplexity:.3f}"} for label, m in models],
        columns=["model", "test rows", *names, "loss", "perplexity"],
    )


def metrics_html(label: str, m: EvalMetrics) -> str:
    if m.task_metric == "preference_accuracy":  # held-out preference pairs (llm_finetune/evaluation/preference_eval.py)
        metric = (f"preference accuracy {m.preference_accuracy:.1%} (95% interval {m.preference_ci_low:.1%} to "
                  f"{m.preference_ci_high:.1%}; chosen answer more likely than rejected), greedy answer equals chosen "
                  f"{m.exact_match:.1%}")
        return f"<p>{html.escape(label)}: {m.rows} held-out pairs, loss {m.loss:.4f}, perplexity {m.perplexity:.3f}, {metric}.</p>"
    headline = (
        f"{m.task_metric} {metric_cell(m, m.task_metric)} on {m.exact_match_rows} test rows "
        f"(answers: {m.task_kind}, median {m.median_reference_words:.0f} words; 95% bootstrap interval in brackets)"
        if m.task_metric in m.scores
        else "no reference completions (raw text): loss and perplexity only"
    )
    others = ", ".join(f"{k} {metric_cell(m, k)}" for k in m.scores if k != m.task_metric)
    return (
        f"<p>{html.escape(label)}: {m.rows} test rows, loss {m.loss:.4f}, perplexity {m.perplexity:.3f}, "
        f"{html.escape(headline)}{'; ' + html.escape(others) if others else ''}.</p>"
    )


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


def variants_table(rows: list[VariantMetrics], tuned: EvalMetrics, tuned_mb: float) -> pd.DataFrame:
    out = [{"model": "tuned (unquantized)", "size MB": tuned_mb, "loss": f"{tuned.loss:.4f}", "Δ loss": "",
            "perplexity": f"{tuned.perplexity:.3f}", "Δ ppl": "", "exact match": f"{tuned.exact_match:.1%}", "Δ EM": "",
            "same answer as tuned": ""}]
    for r in rows:
        out.append({"model": r.variant, "size MB": r.size_mb, "loss": f"{r.metrics.loss:.4f}", "Δ loss": f"{r.loss_delta:+.4f}",
                    "perplexity": f"{r.metrics.perplexity:.3f}", "Δ ppl": f"{r.perplexity_delta:+.3f}",
                    "exact match": f"{r.metrics.exact_match:.1%}", "Δ EM": f"{r.exact_match_delta:+.1%}",
                    "same answer as tuned": f"{r.agreement:.1%}"})
    return pd.DataFrame(out)


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

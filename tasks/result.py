"""The typed result of a fine-tuning run, and the task that assembles and reports it."""

import html
from dataclasses import dataclass
from typing import Optional

import pandas as pd
from flytekit import task
from flytekit.types.directory import FlyteDirectory

from images.specs import cpu_image
from llm_finetune.evaluate import EvalMetrics
from llm_finetune.tracking import TrackedRun, tracking_html
from tasks.common import is_local, local_deck_dir, publish_deck, table_html
from tasks.evaluate import EvalReport, VariantMetrics, metrics_html, variants_table
from tasks.quantize import QuantizedModel


@dataclass
class FineTuneResult:
    tuned_model: FlyteDirectory  # merged full model, loads with from_pretrained
    adapter: Optional[FlyteDirectory]  # LoRA adapter (None for full fine-tuning)
    quantized_model: Optional[FlyteDirectory]  # the first quantize.variants entry (None when there is none)
    base_metrics: EvalMetrics
    tuned_metrics: EvalMetrics
    hub_url: str  # the merged model's repo; empty when publishing was skipped
    quantized: list[QuantizedModel]  # every variant: int8, nf4, gguf_q8_0, ...
    quantized_metrics: list[VariantMetrics]  # each variant on the held-out split, with deltas vs tuned
    benchmarks: dict[str, dict[str, float]]  # lm-eval-harness: {"base": {...}, "tuned": {...}}; empty when off
    hub_urls: list[str]  # every pushed repo


def side_by_side(base: pd.DataFrame, tuned: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "prompt": tuned["prompt"], "reference": tuned["reference"],
        "base": base["prediction"].values if len(base) == len(tuned) else "",
        "tuned": tuned["prediction"], "base correct": base["correct"].values if len(base) == len(tuned) else "",
        "tuned correct": tuned["correct"],
    })


@task(container_image=cpu_image, enable_deck=True)
def summarize(
    tuned_model: FlyteDirectory,
    adapter: Optional[FlyteDirectory],
    quantized: list[QuantizedModel],
    base: EvalReport,
    tuned: EvalReport,
    variants: list[VariantMetrics],
    tuned_mb: float,
    hub_urls: list[str],
    tracking: Optional[TrackedRun] = None,  # the execution's MLflow / W&B run, linked from the deck
) -> FineTuneResult:
    """Compare base, tuned and quantized models side by side, and say where every output is."""
    b, t = base.metrics, tuned.metrics
    rows = [
        ("exact match", f"{b.exact_match:.1%}", f"{t.exact_match:.1%}"),
        ("loss", f"{b.loss:.4f}", f"{t.loss:.4f}"),
        ("perplexity", f"{b.perplexity:.3f}", f"{t.perplexity:.3f}"),
    ] + [(k, f"{base.benchmarks.get(k, float('nan')):.3f}", f"{v:.3f}") for k, v in tuned.benchmarks.items()]
    table = "".join(f"<tr><td>{html.escape(a)}</td><td>{x}</td><td>{y}</td></tr>" for a, x, y in rows)
    samples = side_by_side(base.samples.open(pd.DataFrame).all(), tuned.samples.open(pd.DataFrame).all())
    sections = {
        "Base vs tuned": f"<table><tr><th>metric</th><th>base</th><th>tuned</th></tr>{table}</table>"
        + metrics_html("base", b) + metrics_html("tuned", t),
        "Generations side by side": table_html(samples, max_rows=100),
    }
    if variants:
        sections["Quantized vs tuned"] = table_html(variants_table(variants, t, tuned_mb), max_rows=20)
    if tracking is not None and tracking.backend != "none":
        sections["Tracking"] = tracking_html(tracking)
    publish_deck("summary", sections)
    lines = [f"  {name:<12} base {x:>8}   tuned {y:>8}" for name, x, y in rows]
    for v in variants:
        lines.append(f"  {v.variant:<12} loss {v.metrics.loss:.4f} ({v.loss_delta:+.4f})   exact match "
                     f"{v.metrics.exact_match:.1%} ({v.exact_match_delta:+.1%})   {v.size_mb:.0f} MB (tuned {tuned_mb:.0f} MB)")
    lines += [
        f"  tuned model: {tuned_model.path}",
        f"  adapter:     {adapter.path if adapter else '(none: full fine-tuning)'}",
    ]
    lines += [f"  {q.variant + ':':<12} {q.model.path}{'/' + q.gguf_file if q.gguf_file else ''}" for q in quantized] or [
        "  quantized:   (skipped: quantize.variants is empty)"
    ]
    lines.append(f"  hub:         {', '.join(hub_urls) if hub_urls else '(not published: hub.repo_id is empty)'}")
    if tracking is not None and tracking.run_id:
        lines.append(f"  tracking:    {tracking.backend} {tracking.url}")
    if is_local():
        lines.append(f"  decks:       {local_deck_dir()}/*.html")
    print("[summary] fine-tune results\n" + "\n".join(lines), flush=True)
    return FineTuneResult(
        tuned_model=tuned_model,
        adapter=adapter,
        quantized_model=quantized[0].model if quantized else None,
        base_metrics=b,
        tuned_metrics=t,
        hub_url=hub_urls[0] if hub_urls else "",
        quantized=quantized,
        quantized_metrics=variants,
        benchmarks={"base": base.benchmarks, "tuned": tuned.benchmarks} if tuned.benchmarks else {},
        hub_urls=hub_urls,
    )

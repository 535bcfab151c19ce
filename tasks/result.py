"""The typed result of a fine-tuning run, and the task that assembles and reports it."""

import html
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

import pandas as pd
from flytekit import task
from flytekit.types.directory import FlyteDirectory

from images.specs import cpu_image
from llm_finetune.evaluation.evaluate import EvalMetrics
from llm_finetune.tracking import TrackedRun, open_command, tracking_html
from llm_finetune.evaluation.report import (
    clean_json, cut_warnings, evaluation_section, metric_cell, metrics_html, preference_summary, selection_line,
    sft_task_section, side_by_side, table_html, task_metrics_table, variants_table,
)
from tasks.common import is_local, local_deck_dir, publish_deck, run_dir, write_run_file
from tasks.assess import SFT_TASK_MODELS
from tasks.data import DataReport
from tasks.evaluate import EvalReport, VariantMetrics
from tasks.quantize import QuantizedModel
from tasks.sweep import SweepReport, summary_lines, summary_section, trials_html


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
    # preference pairs (train.method: dpo): tuned minus base preference accuracy on the same held-out
    # pairs with its paired-bootstrap 95% interval, [gain, low, high]; empty for supervised data
    preference_gain: list[float] = field(default_factory=list)
    # SFT -> DPO: the supervised task's test split for "base", "SFT" and "SFT+DPO"; empty without a DPO stage
    sft_task_metrics: dict[str, EvalMetrics] = field(default_factory=dict)
    # the hyperparameter sweep that chose the tuned model (every trial's settings and validation loss); None without one
    sweep: Optional[SweepReport] = None


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
    data_report: Optional[DataReport] = None,
    train_steps: int = 0,  # 0: not given (no checkpoint line)
    best_step: int = -1,
    best_eval_loss: float = 0.0,
    tracking: Optional[TrackedRun] = None,  # the execution's MLflow / W&B run, linked from the deck
    task_scores: Optional[list[EvalReport]] = None,  # SFT -> DPO: the SFT task for base, SFT, SFT+DPO (assess.py)
    sweep: Optional[SweepReport] = None,  # the sweep that chose the trained model (tasks/sweep.py)
) -> FineTuneResult:
    """Compare base, tuned and quantized models side by side, and say where every output is.

    Leads with a warning when more than 1% of the rows were dropped; says which checkpoint
    validation chose; every task metric with its bootstrap 95% interval on the test split.
    """
    b, t = base.metrics, tuned.metrics
    rows = [
        (t.task_metric, metric_cell(b, t.task_metric), metric_cell(t, t.task_metric)),
        ("exact match", f"{b.exact_match:.1%}", f"{t.exact_match:.1%}"),
        ("loss", f"{b.loss:.4f}", f"{t.loss:.4f}"),
        ("perplexity", f"{b.perplexity:.3f}", f"{t.perplexity:.3f}"),
    ] + [(k, f"{base.benchmarks.get(k, float('nan')):.3f}", f"{v:.3f}") for k, v in tuned.benchmarks.items()]
    rows = [r for r in rows if r[1] or r[2]]
    if t.task_metric == "exact_match":
        rows = [r for r in rows if r[0] != "exact match"]
    table = "".join(f"<tr><td>{html.escape(a)}</td><td>{x}</td><td>{y}</td></tr>" for a, x, y in rows)
    base_table, tuned_table = base.samples.open(pd.DataFrame).all(), tuned.samples.open(pd.DataFrame).all()
    samples = side_by_side(base_table, tuned_table)
    preference_lines, preference_gain = preference_summary(b, t, base_table, tuned_table)
    splits = data_report
    drop_note = splits.drop_note if splits is not None else ""
    models = [("base", b), ("tuned", t)] + [(v.variant, v.metrics) for v in variants]
    sft_task = list(zip(SFT_TASK_MODELS, [r.metrics for r in task_scores or []]))
    sft_lines, sft_warnings, sft_deck = sft_task_section(sft_task)
    warnings = ([drop_note] if drop_note else []) + sft_warnings + cut_warnings(models)
    selection = selection_line(train_steps, best_step, best_eval_loss, splits)
    lead = "".join(f"<p style='color:#b00'><b>{html.escape(w)}</b></p>" for w in warnings) + (
        f"<p>{html.escape(selection)}</p>" if selection else "")
    if splits is not None:
        lead += f"<p>{html.escape(splits.length_note)}.</p>"
    if t.max_new_tokens:
        lead += (f"<p>Generation budget {t.max_new_tokens} new tokens (longest reference {t.longest_reference_tokens} "
                 f"tokens); cut predictions: {', '.join(f'{n} {m.cut_predictions}' for n, m in models)}.</p>")
    sections = {
        "Base vs tuned": lead
        + f"<table><tr><th>metric (test split, 95% interval)</th><th>base</th><th>tuned</th></tr>{table}</table>"
        + metrics_html("base", b) + metrics_html("tuned", t),
        "Task metrics, every model": table_html(task_metrics_table(models), max_rows=20),
        "Generations side by side": table_html(samples, max_rows=100),
    }
    if variants:
        sections["Quantized vs tuned"] = table_html(variants_table(variants, t, tuned_mb), max_rows=20)
    if preference_lines:
        sections["Preference accuracy"] = "<pre>" + html.escape("\n".join(preference_lines)) + "</pre>"
    if sft_deck:
        sections["SFT task after DPO"] = sft_deck
    if sweep is not None and sweep.trials:
        sections["Sweep"] = trials_html(sweep)
    if tracking is not None and tracking.backend != "none":
        sections["Tracking"] = tracking_html(tracking)
    publish_deck("summary", sections)
    lines = [f"  WARNING: {w}" for w in warnings]
    lines += summary_lines(sweep)
    lines += preference_lines
    lines += sft_lines
    if selection:
        lines.append(f"  {selection}")
    if splits is not None and splits.batch_note:
        lines.append(f"  batch:       {splits.batch_note}")
    lines += [f"  {name:<12} base {x:>22}   tuned {y:>22}" for name, x, y in rows]
    for v in variants:
        lines.append(f"  {v.variant:<12} loss {v.metrics.loss:.4f} ({v.loss_delta:+.4f})   {t.task_metric} "
                     f"{metric_cell(v.metrics, t.task_metric) or f'{v.metrics.exact_match:.1%}'} ({v.exact_match_delta:+.1%} EM)"
                     f"   {v.size_mb:.0f} MB (tuned {tuned_mb:.0f} MB)")
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
        if open_command(tracking):
            lines.append(f"               open it: {open_command(tracking)}")
    result = FineTuneResult(
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
        preference_gain=preference_gain,
        sft_task_metrics=dict(sft_task),
        sweep=sweep,
    )
    if is_local():
        summary = {
            "warnings": warnings,
            "checkpoint": selection,
            "data": asdict(splits) if splits is not None else {},
            "training": {"steps": train_steps, "best_step": best_step, "best_eval_loss": best_eval_loss} if train_steps else {},
            "evaluation": evaluation_section(models),
            "base": asdict(b), "tuned": asdict(t),
            "quantized": {v.variant: {**asdict(v.metrics), "size_mb": v.size_mb} for v in variants},
            "sft_task": {label: asdict(m) for label, m in sft_task},
            "outputs": {"tuned_model": str(tuned_model.path), "adapter": str(adapter.path) if adapter else "",
                        **{q.variant: str(q.model.path) for q in quantized}},
            "hub_urls": hub_urls,
            "sweep": summary_section(sweep),
        }
        write_run_file("summary.json", json.dumps(clean_json(summary), indent=2, allow_nan=False))
        lines.append(f"  decks:       {local_deck_dir()}/*.html")
        lines.append(f"  run folder:  {run_dir()}  (summary.json, model_card.md, decks/; runs/latest points here)")
    print("[summary] fine-tune results\n" + "\n".join(lines), flush=True)
    return result



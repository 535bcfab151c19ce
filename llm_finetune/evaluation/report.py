"""The run report's rendering: the tables, lines and warnings the summary, the decks and summary.json show.

Flyte-free, so the summary a run prints is unit-tested here and the same text can be produced from a
finished run's metrics anywhere; tasks/result.py's ``summarize`` only gathers the task outputs and
publishes what these functions render.
"""

from __future__ import annotations

import html
import math
import pandas as pd

from llm_finetune.evaluation.metrics import EvalMetrics


def table_html(frame, max_rows: int = 50) -> str:
    """A frame as an escaped HTML table (user text never becomes markup), at most ``max_rows`` rows."""
    return frame.head(max_rows).to_html(index=False, escape=True, border=0)


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


def variants_table(rows: list, tuned: EvalMetrics, tuned_mb: float) -> pd.DataFrame:
    """One row per quantized variant (``VariantMetrics``) beside the unquantized tuned model, with the deltas."""
    out = [{"model": "tuned (unquantized)", "size MB": tuned_mb, "loss": f"{tuned.loss:.4f}", "Δ loss": "",
            "perplexity": f"{tuned.perplexity:.3f}", "Δ ppl": "", "exact match": f"{tuned.exact_match:.1%}", "Δ EM": "",
            "same answer as tuned": ""}]
    for r in rows:
        out.append({"model": r.variant, "size MB": r.size_mb, "loss": f"{r.metrics.loss:.4f}", "Δ loss": f"{r.loss_delta:+.4f}",
                    "perplexity": f"{r.metrics.perplexity:.3f}", "Δ ppl": f"{r.perplexity_delta:+.3f}",
                    "exact match": f"{r.metrics.exact_match:.1%}", "Δ EM": f"{r.exact_match_delta:+.1%}",
                    "same answer as tuned": f"{r.agreement:.1%}"})
    return pd.DataFrame(out)


def preference_summary(base, tuned, base_table: pd.DataFrame, tuned_table: pd.DataFrame) -> tuple[list[str], list[float]]:
    """Summary lines for preference accuracy, and [gain, low, high] of tuned minus base on the same pairs."""
    from llm_finetune.evaluation.preference_eval import paired_difference

    if tuned.task_metric != "preference_accuracy" or len(base_table) != len(tuned_table):
        return [], []
    gain, low, high = paired_difference(tuned_table["correct"].astype(float), base_table["correct"].astype(float))

    def acc(m) -> str:
        return f"{m.preference_accuracy:.1%} [{m.preference_ci_low:.1%}, {m.preference_ci_high:.1%}]"

    verdict = "above base by more than the interval" if low > 0 else "not clearly above base (the interval includes 0)"
    lines = [
        f"  preference accuracy ({tuned.rows} held-out pairs, bootstrap 95% intervals)",
        f"    base {acc(base)}   tuned {acc(tuned)}",
        f"    gain {gain:+.1%} [{low:+.1%}, {high:+.1%}]: tuned is {verdict}",
        f"    mean log-prob margin chosen - rejected: base {base.mean_logp_margin:+.2f}   tuned {tuned.mean_logp_margin:+.2f}",
    ]
    return lines, [gain, low, high]


def side_by_side(base: pd.DataFrame, tuned: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "prompt": tuned["prompt"], "reference": tuned["reference"],
        "base": base["prediction"].values if len(base) == len(tuned) else "",
        "tuned": tuned["prediction"], "base correct": base["correct"].values if len(base) == len(tuned) else "",
        "tuned correct": tuned["correct"],
    })


def evaluation_section(models: list[tuple[str, EvalMetrics]]) -> dict:
    """summary.json's ``evaluation``: the generation budget, the longest reference and the cut predictions.

    ``cut_predictions`` is the tuned model's (the one the run is about); every model's count is beside it.
    """
    by_name = dict(models)
    t = by_name["tuned"]
    return {
        "max_new_tokens": t.max_new_tokens,
        "longest_reference_tokens": t.longest_reference_tokens,
        "cut_predictions": t.cut_predictions,
        "cut_predictions_by_model": {name: m.cut_predictions for name, m in models},
    }


def cut_warnings(models: list[tuple[str, EvalMetrics]]) -> list[str]:
    """One warning per model whose greedy answers hit the generation budget without a stop token."""
    out = []
    for name, m in models:
        if not m.cut_predictions:
            continue
        head = (f"{m.cut_predictions} of {m.exact_match_rows} {name} predictions reached the generation budget of "
                f"{m.max_new_tokens} new tokens without a stop token (longest reference {m.longest_reference_tokens} tokens)")
        if m.max_new_tokens < m.longest_reference_tokens:
            out.append(f"{head}: the budget is shorter than the answers; set evaluate.max_new_tokens: auto, or higher")
        else:
            out.append(f"{head}: the model did not end these answers; they are scored as generated, cut at the budget")
    return out


def sft_task_section(reports: list[tuple[str, EvalMetrics]]) -> tuple[list[str], list[str], str]:
    """After SFT -> DPO: printed lines, warnings and deck HTML for the supervised task's scores of base, SFT and SFT+DPO.

    Warns when SFT+DPO's task score falls below the SFT model's 95% interval: the preference stage
    cost the task the user trained for.
    """
    if not reports:
        return [], [], ""
    models = dict(reports)
    sft, final = models["SFT"], models["SFT+DPO"]
    metric = sft.task_metric
    names = [metric] if metric in sft.scores else []
    lines = ["  SFT task after DPO (test split of data.source; 95% intervals):"]
    for name in names:
        lines.append(f"    {name:<14} " + "   ".join(f"{label} {metric_cell(m, name)}" for label, m in reports))
    lines.append(f"    {'loss':<14} " + "   ".join(f"{label} {m.loss:.4f}" for label, m in reports))
    warnings = []
    if names and final.scores[metric] < sft.scores_low[metric]:
        warnings.append(f"the DPO stage lowered the SFT task's {metric} from {sft.scores[metric]:.1%} (SFT) to "
                        f"{final.scores[metric]:.1%} (SFT+DPO), below the SFT model's 95% interval "
                        f"[{sft.scores_low[metric]:.1%}, {sft.scores_high[metric]:.1%}]: lower preference.train.learning_rate "
                        f"or max_steps, or raise preference.train.dpo.beta")
    deck = ("<p>The task the first stage trained for, on its own test split, before and after the DPO stage "
            "(the preference accuracy above is on the held-out pairs).</p>" + table_html(task_metrics_table(reports), max_rows=5))
    return lines, warnings, deck


def selection_line(train_steps: int, best_step: int, best_eval_loss: float, report=None) -> str:
    """Which checkpoint was returned and on what it was chosen (validation rows, never test rows); ``report``: get_data's
    ``DataReport`` (its ``validation_rows``), or None."""
    if train_steps <= 0:
        return ""
    rows = f" on {report.validation_rows} validation rows" if report is not None else ""
    if best_step >= 0:
        return (f"checkpoint: step {best_step} of {train_steps}, best validation loss "
                f"{best_eval_loss:.4f}{rows} (test rows are used for scores only)")
    return f"checkpoint: the last step ({train_steps}); no validation-based selection (train.eval_steps or save_steps is 0)"


def clean_json(obj):
    """Strict JSON: NaN / inf become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj

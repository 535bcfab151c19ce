"""Sweep trials as Flyte nodes, and the task that picks the winner and draws the sweep deck.

``train_model`` (tasks/train.py) launches one ``train_elastic`` node per trial of ``sweep`` (the
trial's settings applied to the train section), each a cached, retried node with its own resources
and checkpoints; the trials share get_data's splits and the prepared base model. ``sweep.concurrency``
bounds how many train at once: trial ``i`` starts after trial ``i - concurrency`` (lanes). Then
``choose_trial`` reads every trial's validation loss (of the checkpoint it returned), hands the
best one's outputs on as the training result, so evaluation, quantization and publishing run once,
for the winner, and publishes the sweep deck. Test rows never choose: they are not in training's
inputs at all.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
from flytekit import task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from images.specs import cpu_image
from llm_finetune import sweep as sweeps
from llm_finetune.sweep import Trial
from llm_finetune.tracking import TrackedRun, finish_child_run
from tasks.common import WANDB_SECRET, publish_deck, table_html, wandb_api_key
from tasks.train_parts import TrainResult


@dataclass
class SweepReport:
    """What ``summary.json``'s ``sweep`` section, the summary table and the model card say about a sweep."""

    trials: list[Trial] = field(default_factory=list)
    chosen: int = -1  # the winning trial's index
    concurrency: int = 0
    parameters: dict[str, str] = field(default_factory=dict)  # the sweep section's axes, as configured

    def winner(self) -> Trial | None:
        return next((t for t in self.trials if t.chosen), None)


# the training result with the sweep that produced it (None for an ordinary run)
TrainedModel = typing.NamedTuple("TrainedModel", [*typing.get_type_hints(TrainResult).items(),
                                                  ("sweep", Optional[SweepReport])])


def lanes(n: int, concurrency: int) -> list[tuple[int, int]]:
    """(earlier, later) trial pairs that bound ``n`` trials to ``concurrency`` at once: ``later`` waits for ``earlier``."""
    return [(i - concurrency, i) for i in range(concurrency, n)]


@task(container_image=cpu_image, enable_deck=True, secret_requests=[WANDB_SECRET])
def choose_trial(
    settings: list[dict[str, str]],
    model: list[FlyteDirectory],
    adapter: list[Optional[FlyteDirectory]],
    steps: list[int],
    first_loss: list[float],
    final_loss: list[float],
    trained_tokens: list[int],
    tokens_per_s: list[float],
    runtime_s: list[float],
    world_size: list[int],
    best_step: list[int],
    best_eval_loss: list[float],
    resumed_from_step: list[int],
    metrics: list[FlyteFile],
    tracked_run_id: list[str],
    trial_runs: list[TrackedRun],
    concurrency: int,
    parameters: dict[str, str],
) -> TrainedModel:
    """The trial with the lowest validation loss, its outputs as the training result, and the sweep report.

    Each trial's tracked run (a child of the execution's run) gets its final validation loss and whether it
    was chosen, and is ended; a trial served from the cache has its curves replayed into its run first.
    """
    summaries = [json.loads(Path(m.download()).read_text()) for m in metrics]
    histories = [s.get("log_history", []) for s in summaries]
    trials = [
        Trial(index=i, settings=settings[i], validation_loss=sweeps.score(best_eval_loss[i], best_step[i], histories[i]),
              best_step=best_step[i], steps=steps[i], runtime_s=runtime_s[i], tracked_run_id=trial_runs[i].run_id,
              note=summaries[i].get("diverged", ""))  # tasks/train.py diverged_trial
        for i in range(len(settings))
    ]
    win = sweeps.choose(trials)
    trials[win].chosen = True
    report = SweepReport(trials=trials, chosen=win, concurrency=concurrency, parameters=parameters)
    key = wandb_api_key() if any(r.backend == "wandb" for r in trial_runs) else ""
    for t, run, history, streamed in zip(trials, trial_runs, histories, tracked_run_id):
        finish_child_run(run, {"validation_loss": t.validation_loss, "chosen": float(t.chosen)}, history,
                         replay=streamed != run.run_id, api_key=key)
    print("[sweep] trials (validation loss of the returned checkpoint; * = chosen):\n" + "\n".join(sweeps.table(trials)),
          flush=True)
    publish_deck("sweep", {
        "Trials": trials_html(report),
        "Validation curves": curves_html(trials, histories),
    })
    i = win
    return TrainedModel(model[i], adapter[i], steps[i], first_loss[i], final_loss[i], trained_tokens[i], tokens_per_s[i],
                        runtime_s[i], world_size[i], best_step[i], best_eval_loss[i], resumed_from_step[i], metrics[i],
                        tracked_run_id[i], report)


def trials_frame(report: SweepReport) -> pd.DataFrame:
    """One row per trial: its settings, validation loss, steps, wall time, and whether it was chosen."""
    rows = []
    for t in report.trials:
        rows.append({"trial": t.index, "chosen": "yes" if t.chosen else "",
                     **{k.removeprefix("train."): v for k, v in sweeps.decoded(t).items()},
                     "validation loss": round(t.validation_loss, 5) if math.isfinite(t.validation_loss) else None,
                     "returned step": t.best_step if t.best_step >= 0 else t.steps, "steps": t.steps,
                     "wall time (s)": round(t.runtime_s, 1), "note": t.note})
    return pd.DataFrame(rows).sort_values("validation loss", na_position="last", kind="stable")


_SORTABLE = """<script>
document.querySelectorAll('table.sweep th').forEach(function (th, col) {
  th.style.cursor = 'pointer'; th.title = 'sort';
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows), up = th.dataset.up !== '1';
    rows.sort(function (a, b) {
      var x = a.cells[col].innerText, y = b.cells[col].innerText, nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return up ? c : -c;
    });
    th.dataset.up = up ? '1' : '0'; rows.forEach(function (r) { body.appendChild(r); });
  });
});
</script>"""


def trials_html(report: SweepReport) -> str:
    """The sortable trial table (click a header), the chosen trial in bold, with how it was chosen."""
    w = report.winner()
    lead = (f"<p>{len(report.trials)} trials, at most {report.concurrency} training at once. Chosen: trial {w.index} "
            f"({sweeps.label(sweeps.decoded(w))}), validation loss {w.validation_loss:.4f}: the lowest validation loss of "
            "the checkpoint each trial returned. Test rows are not used to choose; they score the winner.</p>")
    frame = trials_frame(report)
    table = frame.to_html(index=False, classes="sweep", border=0, na_rep="diverged / none")
    for t in report.trials:
        if t.chosen:  # the chosen row in bold
            table = table.replace(f"<td>{t.index}</td>\n      <td>yes</td>", f"<td><b>{t.index}</b></td>\n      <td><b>yes</b></td>")
    return lead + table + _SORTABLE


def curves_html(trials: list[Trial], histories: list[list[dict]]) -> str:
    """Every trial's validation (and training) loss on one plot; the chosen trial drawn thicker."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for t, history in zip(trials, histories):
        name = f"{t.index}: {sweeps.label(sweeps.decoded(t))}"
        evals = [h for h in history if "eval_loss" in h]
        logs = [h for h in history if "loss" in h]
        width = 4 if t.chosen else 1.5
        fig.add_trace(go.Scatter(x=[h["step"] for h in evals], y=[h["eval_loss"] for h in evals], mode="lines+markers",
                                 name=f"{name} (validation){' chosen' if t.chosen else ''}", line={"width": width}))
        fig.add_trace(go.Scatter(x=[h["step"] for h in logs], y=[h["loss"] for h in logs], mode="lines",
                                 name=f"{name} (train)", line={"width": 1, "dash": "dot"}, visible="legendonly"))
    fig.update_layout(height=420, xaxis_title="step", yaxis_title="loss")
    return fig.to_html(full_html=False, include_plotlyjs=True)


def summary_section(report: SweepReport | None) -> dict:
    """``summary.json``'s ``sweep`` section: every trial's settings and validation loss, and the chosen one."""
    if report is None or not report.trials:
        return {}
    w = report.winner()
    return {
        "trials": [{"trial": t.index, "settings": sweeps.decoded(t), "validation_loss": t.validation_loss,
                    "returned_step": t.best_step if t.best_step >= 0 else t.steps, "steps": t.steps,
                    "runtime_s": t.runtime_s, "chosen": t.chosen} for t in report.trials],
        "chosen": {"trial": w.index, "settings": sweeps.decoded(w), "validation_loss": w.validation_loss},
        "concurrency": report.concurrency,
        "parameters": {k: json.loads(v) for k, v in report.parameters.items()},
        "chosen_by": "lowest validation loss of the checkpoint each trial returned (test rows not used)",
    }


def summary_lines(report: SweepReport | None) -> list[str]:
    if report is None or not report.trials:
        return []
    w = report.winner()
    return [f"  sweep:       {len(report.trials)} trials, chosen trial {w.index} ({sweeps.label(sweeps.decoded(w))}) "
            "by validation loss"] + sweeps.table(report.trials)


def card_section(report: SweepReport | None) -> str:
    """The model card's sweep section (markdown): the winning settings and every trial beside it."""
    if report is None or not report.trials:
        return ""
    w = report.winner()
    rows = trials_frame(report).fillna("diverged / none")
    head = "| " + " | ".join(rows.columns) + " |\n|" + "---|" * len(rows.columns) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in r) + " |\n" for r in rows.itertuples(index=False))
    return (f"Chosen by a hyperparameter sweep of {len(report.trials)} trials on validation loss (test rows not used): "
            f"**{sweeps.label(sweeps.decoded(w))}**, validation loss {w.validation_loss:.4f}. The training config below "
            f"holds these settings.\n\n{head}{body}")


def chosen_config(config, report: SweepReport | None):
    """``config`` with the winning trial's settings in its train section (what the published model trained with)."""
    if report is None or report.winner() is None:
        return config
    import dataclasses

    return dataclasses.replace(config, train=sweeps.apply(config.train, sweeps.decoded(report.winner())))

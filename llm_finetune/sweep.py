"""Hyperparameter sweeps: the ``sweep`` config section, its trials, and the choice of the winner.

A sweep trains one model per trial setting on the same prepared data and base model, and keeps
the trial whose returned checkpoint has the lowest validation loss (validation rows only: the
test rows score the winner afterwards, they never choose it). The Flyte side runs each trial as
its own cached training node (tasks/sweep.py); this module is the Flyte-free part: which
trials, how a trial's settings land in ``TrainConfig``, which trial won, and the table.

The section, in YAML (keys are ``train.`` paths; a list is a grid axis, a mapping a distribution)::

    sweep:
      train.learning_rate: [1.0e-4, 3.0e-4, 1.0e-3]     # grid: every combination (trials: 0)
      train.lora.r: [8, 16]
      concurrency: 2                                    # trials training at once

    sweep:
      train.learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}
      train.lora.r: [8, 16, 32]                         # sampled uniformly when trials > 0
      trials: 8                                         # seeded random sample of 8 settings
      seed: 0

Distributions: ``log_uniform: [low, high]`` and ``uniform: [low, high]`` (floats, rounded to 3
significant digits so that a setting reads well and keys the cache the same way every time),
``int_uniform: [low, high]`` (both ends included) and ``choice: [a, b, ...]``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from dataclasses import dataclass, field

DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform", "choice")
# the section's own settings; every other key is a parameter path (``train.<key>``)
SETTINGS = ("parameters", "trials", "seed", "max_trials", "concurrency")


@dataclass
class SweepConfig:
    """``sweep``: the settings to try. Empty ``parameters`` (the default) = one ordinary run."""

    # "train.learning_rate" -> the JSON of its list (grid axis) or its distribution ({"log_uniform": [lo, hi]})
    parameters: dict[str, str] = field(default_factory=dict)
    trials: int = 0  # 0: every combination of the lists (a grid); N: a seeded random sample of N settings
    seed: int = 0
    max_trials: int = 16  # a guard: a sweep expanding to more trials than this is refused before any training
    concurrency: int = 2  # trials training at the same time (each with the train section's resources)

    @property
    def enabled(self) -> bool:
        return bool(self.parameters)


def normalize(section: dict) -> dict:
    """The YAML section with its parameter paths (``train.learning_rate: [...]``) moved under ``parameters``,
    each value as JSON: the dataclass holds them as strings, which Flyte serialises like any other field."""
    out, params = {}, {}
    for key, value in section.items():
        if key in SETTINGS and key != "parameters":
            out[key] = value
        elif key == "parameters" and isinstance(value, dict):
            params.update(value)
        else:
            params[key] = value
    out["parameters"] = {str(k): v if isinstance(v, str) and _is_json(v) else json.dumps(v) for k, v in params.items()}
    return out


def _is_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), (list, dict))
    except ValueError:
        return False


@dataclass
class Axis:
    key: str
    values: list | None = None  # a grid axis (or choices sampled from, in a random sweep)
    distribution: str = ""
    low: float = 0.0
    high: float = 0.0

    def sample(self, rng: random.Random):
        if self.values is not None:
            return rng.choice(self.values)
        if self.distribution == "int_uniform":
            return rng.randint(int(self.low), int(self.high))
        if self.distribution == "log_uniform":
            x = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            x = rng.uniform(self.low, self.high)
        return float(f"{x:.3g}")


def axes(sweep: SweepConfig) -> tuple[list[Axis], list[str]]:
    """The parsed axes (in the config's key order) and the problems of their values."""
    out, problems = [], []
    for key, text in sweep.parameters.items():
        where = f"sweep.{key}"
        try:
            spec = json.loads(text)
        except ValueError:
            problems.append(f"{where}: not a list or a distribution: {text!r}")
            continue
        if isinstance(spec, list):
            if not spec:
                problems.append(f"{where}: an empty list tries nothing; give at least one value")
            elif any(isinstance(v, (list, dict)) for v in spec):
                problems.append(f"{where}: values must be numbers, strings or booleans, got {spec!r}")
            elif len({json.dumps(v) for v in spec}) != len(spec):
                problems.append(f"{where}: {spec!r} repeats a value; each value trains once, list it once")
            else:
                out.append(Axis(key, values=spec))
            continue
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            problems.append(f"{where}: give a list of values or one distribution ({', '.join(DISTRIBUTIONS)}), "
                            f"e.g. {{log_uniform: [1.0e-5, 1.0e-3]}}; got {spec!r}")
            continue
        (name, arg), = spec.items()
        if name == "choice":
            if not isinstance(arg, list) or not arg:
                problems.append(f"{where}.choice: give a non-empty list of values, got {arg!r}")
            else:
                out.append(Axis(key, values=arg))
            continue
        if (not isinstance(arg, list) or len(arg) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)):
            problems.append(f"{where}.{name}: give [low, high] as two numbers, got {arg!r}")
            continue
        low, high = arg
        if not low < high:
            problems.append(f"{where}.{name}: the range [{low}, {high}] is empty; low must be below high")
        elif name == "log_uniform" and low <= 0:
            problems.append(f"{where}.log_uniform: low must be > 0 on a log scale, got {low}; use uniform for ranges "
                            "that include 0")
        elif name == "int_uniform" and not (float(low).is_integer() and float(high).is_integer()):
            problems.append(f"{where}.int_uniform: low and high must be integers, got [{low}, {high}]")
        else:
            out.append(Axis(key, distribution=name, low=low, high=high))
    return out, problems


def grid_size(found: list[Axis]) -> int | None:
    """How many distinct settings the axes hold (None when a continuous distribution makes it unbounded)."""
    if any(a.values is None for a in found):
        return None
    return math.prod(len(a.values) for a in found)


def expand(sweep: SweepConfig) -> list[dict]:
    """Every trial's settings, ``{"train.learning_rate": 0.0003, ...}``, in a fixed order.

    A grid (``trials: 0``) in the order of the config's keys, the last key varying fastest; a random
    sweep draws ``trials`` distinct settings with ``random.Random(seed)``. Call ``problems`` first.
    """
    found, bad = axes(sweep)
    if bad:
        raise ValueError("; ".join(bad))
    if sweep.trials <= 0:
        return [dict(zip([a.key for a in found], combo)) for combo in itertools.product(*(a.values for a in found))]
    rng, out, seen = random.Random(sweep.seed), [], set()
    for _ in range(sweep.trials * 100):  # distinct settings only: a repeated one would train the same model twice
        setting = {a.key: a.sample(rng) for a in found}
        fingerprint = json.dumps(setting, sort_keys=True)
        if fingerprint not in seen:
            seen.add(fingerprint)
            out.append(setting)
        if len(out) == sweep.trials:
            break
    return out


def problems(sweep: SweepConfig) -> list[str]:
    """The section's own problems: the axes, the trial count against ``max_trials``, the concurrency."""
    if not sweep.enabled:
        return []
    found, p = axes(sweep)
    if sweep.trials < 0:
        p.append(f"sweep.trials: must be >= 0 (0 = every combination of the lists), got {sweep.trials}")
    if sweep.max_trials < 1:
        p.append(f"sweep.max_trials: must be >= 1, got {sweep.max_trials}")
    if sweep.concurrency < 1:
        p.append(f"sweep.concurrency: must be >= 1 (trials training at once), got {sweep.concurrency}")
    if p:
        return p
    size = grid_size(found)
    if sweep.trials == 0:
        if size is None:
            ranged = [a.key for a in found if a.values is None]
            p.append(f"sweep.trials: {', '.join(ranged)} {'is' if len(ranged) == 1 else 'are'} sampled from a range, which "
                     "has no grid; set sweep.trials to the number of random settings to train, e.g. trials: 8")
        elif size > sweep.max_trials:
            lengths = " x ".join(f"{len(a.values)} ({a.key})" for a in found)
            p.append(f"sweep: the grid has {size} trials ({lengths}), more than sweep.max_trials {sweep.max_trials}; "
                     "shorten a list, sample with sweep.trials, or raise sweep.max_trials")
    else:
        if sweep.trials > sweep.max_trials:
            p.append(f"sweep.trials: {sweep.trials} is more than sweep.max_trials {sweep.max_trials}; lower trials or raise "
                     "max_trials")
        elif size is not None and sweep.trials > size:
            p.append(f"sweep.trials: {sweep.trials} random settings asked for, but the lists hold only {size} distinct "
                     f"ones; use the grid (trials: 0) or add values")
    return p


def apply(obj, settings: dict, prefix: str = "train"):
    """``obj`` (the ``train`` dataclass) with each ``prefix.a.b: value`` setting replaced, nested sections included."""
    for key, value in settings.items():
        path = key.split(".")[1:] if key.split(".")[0] == prefix else key.split(".")
        obj = _replace(obj, path, value)
    return obj


def _replace(obj, path: list[str], value):
    head, rest = path[0], path[1:]
    return dataclasses.replace(obj, **{head: _replace(getattr(obj, head), rest, value) if rest else value})


def label(settings: dict) -> str:
    """``learning_rate=0.0003 lora.r=16``: a trial's settings in one short line."""
    return " ".join(f"{k.removeprefix('train.')}={_short(v)}" for k, v in settings.items())


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


@dataclass
class Trial:
    """One finished trial, as the sweep table and ``summary.json``'s ``sweep`` section list it."""

    index: int
    settings: dict[str, str]  # parameter path -> the value as JSON
    validation_loss: float  # of the checkpoint the trial returned (its best, or its last step)
    best_step: int  # the returned checkpoint's step; -1 = the last step
    steps: int
    runtime_s: float
    tracked_run_id: str = ""
    chosen: bool = False
    note: str = ""  # why it has no validation loss, e.g. "diverged at step 3: training loss is nan ..."


def score(best_eval_loss: float, best_step: int, log_history: list[dict]) -> float:
    """The validation loss of the model a trial returns: its best checkpoint's, else its last validation's
    (without checkpoint selection the last step is returned); NaN when it never validated."""
    if best_step >= 0 and math.isfinite(best_eval_loss):
        return best_eval_loss
    losses = [h["eval_loss"] for h in log_history if "eval_loss" in h]
    return float(losses[-1]) if losses else math.nan


def choose(trials: list[Trial]) -> int:
    """The index (into ``trials``) of the lowest finite validation loss; the earlier trial on a tie."""
    finite = [(t.validation_loss, i) for i, t in enumerate(trials) if math.isfinite(t.validation_loss)]
    if not finite:
        raise ValueError("no sweep trial has a finite validation loss (every trial diverged or never validated); "
                         "check train.eval_steps and the learning rates swept")
    return min(finite)[1]


def table(trials: list[Trial]) -> list[str]:
    """The trials as text lines, best first, the chosen one marked with ``*``."""
    rows = sorted(trials, key=lambda t: (not math.isfinite(t.validation_loss), t.validation_loss, t.index))
    width = max((len(label(decoded(t))) for t in rows), default=8)
    lines = [f"    {'trial':<6} {'settings':<{width}}  {'val loss':>9}  {'step':>5}  {'time':>7}"]
    for t in rows:
        mark = "*" if t.chosen else " "
        loss = f"{t.validation_loss:>9.4f}" if math.isfinite(t.validation_loss) else f"{'diverged' if t.note else 'none':>9}"
        lines.append(f"  {mark} {t.index:<6} {label(decoded(t)):<{width}}  {loss}  "
                     f"{t.best_step if t.best_step >= 0 else t.steps:>5}  {t.runtime_s:>6.0f}s" + (f"  {t.note}" if t.note else ""))
    return lines


def encoded(settings: dict) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in settings.items()}


def decoded(trial: Trial) -> dict:
    return {k: json.loads(v) for k, v in trial.settings.items()}

"""Task metrics that fit the answers, each with a bootstrap 95% confidence interval.

The kind of task is read from the references:
- ``json``: most references parse as a JSON object or array (extraction tasks). The headline
  is ``json_field_f1``: the F1 of the (key path, value) leaves the prediction shares with the
  reference, so a right key with a wrong value counts against it and one wrong field of ten
  costs a tenth, which is how users of extraction judge a model (``json_exact`` is
  all-or-nothing). Beside it ``valid_json`` (the prediction parses), ``json_exact`` (equal
  once parsed: key order and whitespace do not matter) and ``json_structure`` (same key
  paths with the same value types, values ignored: a format check).
- ``exact_match``: short answers (median reference <= ``evaluate.short_answer_words`` words).
- ``chrf``: free text. Sentence-level chrF from sacrebleu (character n-gram F-score,
  0..1 here), averaged over rows.
``exact_match`` is reported for every kind. Test sets of 40-200 rows are common, so every
score comes with a percentile bootstrap interval over rows (fixed seed: deterministic).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

HEADLINE = {"json": "json_field_f1", "exact_match": "exact_match", "chrf": "chrf"}


@dataclass
class Score:
    value: float
    low: float
    high: float


def bootstrap_interval(scores, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-row ``scores``."""
    x = np.asarray(list(scores), dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // len(x))  # bound the index matrix to ~16 MB
    for start in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - start)
        means[start : start + k] = x[rng.integers(0, len(x), size=(k, len(x)))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def parse_json(text: str):
    """The JSON value in ``text`` (a ```json fence is allowed), or None."""
    t = str(text).strip()
    if t.startswith("```"):
        t = t.strip("`").strip()
        t = t[4:].strip() if t.lower().startswith("json") else t
    try:
        return json.loads(t)
    except (ValueError, TypeError):
        return None


def _shape(value, path: str = "$") -> set[tuple[str, str]]:
    """(key path, type) pairs of a JSON value; list items share the path ``[]``."""
    kind = "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__
    out = {(path, kind)}
    if isinstance(value, dict):
        for k, v in value.items():
            out |= _shape(v, f"{path}.{k}")
    elif isinstance(value, list):
        for v in value:
            out |= _shape(v, f"{path}[]")
    return out


def _leaf_value(value):
    """A leaf compared by meaning: numbers numerically (1 == 1.0), strings with whitespace collapsed."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return ("number", float(value))
    if isinstance(value, str):
        return ("string", " ".join(value.split()))
    return value


def json_leaves(value, path: str = "$") -> Counter:
    """The multiset of (key path, leaf value) pairs of a JSON value.

    Array items share the path ``[]``, so an array is compared as the multiset of its leaves
    (order ignored, repeats counted). An empty object or array is a leaf of its own, so
    ``{"tags": []}`` and ``{}`` differ.
    """
    out: Counter = Counter()
    if isinstance(value, dict) and value:
        for k, v in value.items():
            out += json_leaves(v, f"{path}.{k}")
    elif isinstance(value, list) and value:
        for v in value:
            out += json_leaves(v, f"{path}[]")
    else:
        out[(path, _leaf_value(value) if not isinstance(value, (dict, list)) else type(value).__name__)] += 1
    return out


def field_f1(prediction, reference) -> float:
    """F1 of the shared (key path, value) leaves: 2 * shared / (predicted leaves + reference leaves)."""
    p, r = json_leaves(prediction), json_leaves(reference)
    shared = sum((p & r).values())
    total = sum(p.values()) + sum(r.values())
    return 2.0 * shared / total if total else 1.0


def task_kind(references: list[str], short_answer_words: int) -> str:
    if not references:
        return "exact_match"
    parsed = [parse_json(r) for r in references]
    if sum(isinstance(p, (dict, list)) for p in parsed) >= 0.8 * len(references):
        return "json"
    words = float(np.median([len(str(r).split()) for r in references]))
    return "exact_match" if words <= short_answer_words else "chrf"


def row_scores(kind: str, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-row scores in [0, 1] for every metric of ``kind`` (exact match always)."""
    out = {"exact_match": [float(p.strip() == r.strip()) for p, r in zip(predictions, references)]}
    if kind == "json":
        valid, structure, exact, f1 = [], [], [], []
        for p, r in zip(predictions, references):
            pj, rj = parse_json(p), parse_json(r)
            ok = pj is not None or str(p).strip() == "null"
            valid.append(float(ok))
            structure.append(float(ok and rj is not None and _shape(pj) == _shape(rj)))
            exact.append(float(ok and pj == rj))
            f1.append(field_f1(pj, rj) if ok and rj is not None else 0.0)
        out.update(json_field_f1=f1, valid_json=valid, json_exact=exact, json_structure=structure)
    elif kind == "chrf":
        from sacrebleu.metrics import CHRF

        chrf = CHRF()
        out["chrf"] = [chrf.sentence_score(p.strip(), [r.strip()]).score / 100.0 for p, r in zip(predictions, references)]
    return out


def score(kind: str, predictions: list[str], references: list[str], seed: int = 0) -> dict[str, Score]:
    """Mean of each metric with its bootstrap 95% interval."""
    out = {}
    for name, values in row_scores(kind, predictions, references).items():
        low, high = bootstrap_interval(values, seed=seed)
        out[name] = Score(float(np.mean(values)) if values else math.nan, low, high)
    return out


@dataclass
class EvalMetrics:
    rows: int = 0
    loss: float = 0.0  # mean NLL per trained token
    perplexity: float = 0.0
    exact_match: float = 0.0  # share of rows whose completion equals the reference
    exact_match_rows: int = 0  # rows with a reference completion (0 for raw text data)
    task_metric: str = "exact_match"  # the headline metric: exact_match, json_field_f1 (JSON answers) or chrf (free text)
    median_reference_words: float = 0.0
    # preference pairs (preference_eval.py): share of held-out pairs whose chosen answer the model
    # gives more log-probability than the rejected one, with its bootstrap 95% interval
    preference_accuracy: float = 0.0
    preference_ci_low: float = 0.0
    preference_ci_high: float = 0.0
    mean_logp_margin: float = 0.0  # mean log p(chosen) - log p(rejected)
    task_kind: str = "exact_match"  # exact_match | json | chrf (metrics.task_kind)
    scores: dict[str, float] = field(default_factory=dict)  # every task metric, 0..1
    scores_low: dict[str, float] = field(default_factory=dict)  # bootstrap 95% interval, lower end
    scores_high: dict[str, float] = field(default_factory=dict)  # ... and upper end
    # the generation budget (evaluate.max_new_tokens, auto = fitted to the references) and the
    # predictions that spent it without a stop token: a cut answer scores as wrong, so say so
    max_new_tokens: int = 0
    longest_reference_tokens: int = 0
    cut_predictions: int = 0

"""Task metrics that fit the answers, each with a bootstrap 95% confidence interval.

The kind of task is read from the references:
- ``json``: most references parse as a JSON object or array (extraction tasks). Scored by
  ``valid_json`` (the prediction parses), ``json_structure`` (same key paths with the same
  value types, values ignored) and ``json_exact`` (equal once parsed: key order and
  whitespace do not matter).
- ``exact_match``: short answers (median reference <= ``evaluate.short_answer_words`` words).
- ``chrf``: free text. Sentence-level chrF from sacrebleu (character n-gram F-score,
  0..1 here), averaged over rows.
``exact_match`` is reported for every kind. Test sets of 40-200 rows are common, so every
score comes with a percentile bootstrap interval over rows (fixed seed: deterministic).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

HEADLINE = {"json": "json_structure", "exact_match": "exact_match", "chrf": "chrf"}


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
        valid, structure, exact = [], [], []
        for p, r in zip(predictions, references):
            pj, rj = parse_json(p), parse_json(r)
            ok = pj is not None or str(p).strip() == "null"
            valid.append(float(ok))
            structure.append(float(ok and rj is not None and _shape(pj) == _shape(rj)))
            exact.append(float(ok and pj == rj))
        out.update(valid_json=valid, json_structure=structure, json_exact=exact)
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

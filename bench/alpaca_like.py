"""Synthetic Alpaca-shaped rows with Alpaca-like lengths, generated offline from a seed.

Alpaca-cleaned (about 52k rows) has short instructions (median ~12 words), an input on
about 40% of rows, and outputs with a long tail (median ~40 words, some several hundred).
Word counts here follow log-normal distributions fitted to those shapes; the words come
from a fixed vocabulary, so tokenizer cost per word is realistic-ish English.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part "
    "explain describe list summarize translate classify generate rewrite answer example sentence paragraph data "
    "model function python recipe history science climate economy health policy market customer product design"
).split()


def _words(rng: random.Random, median: float, sigma: float, cap: int) -> str:
    n = max(1, min(cap, int(rng.lognormvariate(0, sigma) * median)))
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append(
            {
                "instruction": _words(rng, 12, 0.5, 80) + f" ({i})",
                "input": _words(rng, 15, 0.8, 200) if rng.random() < 0.4 else "",
                "output": _words(rng, 40, 0.9, 600),
            }
        )
    return out


def write_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed)), encoding="utf-8")
    return path

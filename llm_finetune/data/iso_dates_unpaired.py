"""The embedded KTO set: ISO-date rewrites, each prompt with one answer and a thumbs up or down.

Built from the preference pairs (iso_dates_preference.py) the way feedback data arrives: a user
saw one answer and rated it. For each pair a seeded coin keeps either the right answer
(``label: true``) or the typical wrong one (``label: false``), so no prompt has both and the
data is truly unpaired, about half desirable. ``python -m llm_finetune.data.iso_dates_unpaired``
regenerates the shipped ``iso_dates_unpaired.jsonl`` byte for byte; a test checks it.
"""

from __future__ import annotations

import random
from pathlib import Path

from llm_finetune.data import iso_dates_preference
from llm_finetune.data.iso_dates import to_jsonl

SHIPPED_FILE = Path(__file__).with_name("iso_dates_unpaired.jsonl")
DEFAULT_SEED = 20261203


def generate(rows: int = iso_dates_preference.DEFAULT_ROWS, seed: int = DEFAULT_SEED) -> list[dict]:
    """``{prompt, completion, label}`` records, one per preference pair, deterministic."""
    rng = random.Random(seed)
    out = []
    for pair in iso_dates_preference.generate(rows):
        good = rng.random() < 0.5
        out.append({"prompt": pair["prompt"], "completion": pair["chosen"] if good else pair["rejected"], "label": good})
    return out


def write(path: Path = SHIPPED_FILE, rows: int = iso_dates_preference.DEFAULT_ROWS, seed: int = DEFAULT_SEED) -> Path:
    path.write_text(to_jsonl(generate(rows, seed)), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(f"wrote {write()}")

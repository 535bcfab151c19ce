import datetime as dt
import json
import re

from llm_finetune.data import iso_dates


def test_shipped_file_is_the_generator_output_byte_for_byte():
    assert iso_dates.SHIPPED_FILE.read_text(encoding="utf-8") == iso_dates.to_jsonl(iso_dates.generate())


def test_rows_are_many_distinct_and_correct():
    rows = [json.loads(line) for line in iso_dates.SHIPPED_FILE.read_text().splitlines()]
    assert len(rows) >= 500
    assert len({r["output"] for r in rows}) == len(rows)
    for r in rows:
        date = dt.date.fromisoformat(r["output"])  # a real calendar date
        # the year and the day appear in the input, the month by name or number
        assert str(date.year) in r["input"]
        assert re.search(rf"(?<!\d)0?{date.day}(?!\d)", r["input"]), r
        month = iso_dates.MONTHS[date.month - 1]
        assert month in r["input"] or month[:3] in r["input"] or f"{date.month:02d}" in r["input"], r


def test_generation_depends_on_seed():
    assert iso_dates.generate(20, seed=1) == iso_dates.generate(20, seed=1)
    assert iso_dates.generate(20, seed=1) != iso_dates.generate(20, seed=2)

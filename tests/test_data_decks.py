"""get_data as a Flyte task on messy data: typed outputs, and decks that render in a browser."""

import pytest
import html
import json
import re

import pandas as pd

from llm_finetune.config import DataConfig
from tests.chromium import render

pytestmark = pytest.mark.slow  # every test here trains a model or starts a process (tests/tiers.py)


def messy_rows():
    rows = [{"instruction": f"Spell {i} in words.", "input": "", "output": f"number {i}"} for i in range(60)]
    rows[2]["output"] = ""  # empty completion
    rows[4] = dict(rows[3])  # duplicate
    rows[6]["instruction"] = "   "  # empty prompt
    rows[8]["output"] = "very long answer " * 200  # too long for max_length 128
    rows[0]["output"] = "<script>alert('x')</script> & <b>zero</b>"  # user text must be shown as text
    rows[1]["output"] = "<script>alert('y')</script> & <b>one</b>"
    return rows


def test_get_data_task_outputs_and_decks_render(isolated_flyte, base_model_dir):
    from flytekit.types.directory import FlyteDirectory

    from tasks.data import get_data

    src = isolated_flyte / "messy.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in messy_rows()), encoding="utf-8")
    cfg = DataConfig(source=str(src), max_length=128, packing=True, max_drop_fraction=0.1)
    splits = get_data(data=cfg, base_model=FlyteDirectory(str(base_model_dir)))

    assert (splits.format, splits.dropped_rows) == ("alpaca", 4)
    assert splits.train_rows + splits.validation_rows + splits.test_rows == 56
    tokens = splits.train_tokens.open(pd.DataFrame).all()
    assert len(tokens) == splits.token_rows < splits.train_rows  # packed
    assert set(tokens.columns) >= {"input_ids", "labels", "seq_lens", "source_rows"}
    assert tokens["input_ids"].map(len).max() <= 128

    page = isolated_flyte / "decks" / "get_data.html"
    html_text = page.read_text()
    for text in ("Rows in: <b>60</b>", "kept: <b>56</b>", "empty_completion", "duplicate", "too_long", "Failure cases"):
        assert text in html_text
    assert "<script>alert" not in html_text  # user text never becomes markup...
    visible = html.unescape(re.sub(r"<[^>]+>", "", html_text))
    assert "<script>alert(" in visible  # ...but is shown as the text it is
    shown = render(page)
    assert shown.console_errors == []
    assert shown.dom.count("class=\"main-svg\"") >= 2  # plotly drew the length histogram
    for section in ("Validation", "Data profile", "Sample prompts"):
        assert f"<h2>{section}</h2>" in shown.dom
    assert "class=\"trained\"" in shown.dom and "class=\"prompt\"" in shown.dom


def test_render_reports_script_errors(tmp_path):
    """The browser check can fail: a page with a broken script is reported."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><p>hi</p><script>undefinedFunction()</script></body></html>")
    shown = render(page)
    assert any("undefinedFunction" in e for e in shown.console_errors)

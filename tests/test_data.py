import json

import pandas as pd
import pytest

from llm_finetune.config import DataConfig
from llm_finetune.data.formats import detect_format
from llm_finetune.data.prepare import prepare
from llm_finetune.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def alpaca_rows(n):
    return [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(n)]


def test_embedded_default_prepares_three_way_split(tokenizer):
    p = prepare(DataConfig(), tokenizer)
    assert p.format == "alpaca" and "auto-detected" in p.format_reason
    kept = p.report.rows_kept
    assert p.report.rows_in == 1000 and set(p.report.dropped) <= {"too_long"}
    assert 1000 - kept <= 10  # max_length auto keeps at least 99% of the rows
    assert (len(p.validation), len(p.test)) == (50, 100) and len(p.train) == kept - 150
    rows = [set(f["source_row"]) for f in (p.train, p.validation, p.test)]
    assert rows[0].isdisjoint(rows[1]) and rows[0].isdisjoint(rows[2]) and rows[1].isdisjoint(rows[2])
    assert (p.train["n_trained_tokens"] > 0).all() and (p.train["n_trained_tokens"] < p.train["n_tokens"]).all()


def test_same_inputs_give_identical_splits(tokenizer, tmp_path):
    a, b = prepare(DataConfig(), tokenizer), prepare(DataConfig(), tokenizer)
    for name in ("train", "validation", "test"):
        getattr(a, name).to_parquet(tmp_path / "a.parquet")
        getattr(b, name).to_parquet(tmp_path / "b.parquet")
        assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    c = prepare(DataConfig(seed=7), tokenizer)
    assert set(c.test["source_row"]) != set(a.test["source_row"])


@pytest.mark.parametrize(
    "columns, fmt",
    [
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "context", "response", "category"], "dolly"),
        (["messages"], "chat"),
        (["text"], "text"),
    ],
)
def test_auto_detects_each_format(columns, fmt):
    assert detect_format(columns).format == fmt


def test_unknown_columns_say_how_to_map(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}] * 30)
    with pytest.raises(DataError, match="data.columns"):
        prepare(DataConfig(source=src), None)


def test_column_mapping(tokenizer, tmp_path):
    rows = [{"question": f"What is {i} squared?", "answer": str(i * i)} for i in range(40)]
    src = write_jsonl(tmp_path / "q.jsonl", rows)
    p = prepare(DataConfig(source=src, columns={"instruction": "question", "output": "answer"}), tokenizer)
    assert p.format == "alpaca" and len(p.train) + len(p.validation) + len(p.test) == 40


def test_dolly_chat_and_text_formats(tokenizer, tmp_path):
    dolly = [{"instruction": f"Summarise item {i}.", "context": f"Item {i} is blue.", "response": "Blue.", "category": "summarization"} for i in range(30)]
    p = prepare(DataConfig(source=write_jsonl(tmp_path / "d.jsonl", dolly)), tokenizer)
    assert p.format == "dolly"
    assert "Item 0 is blue." in json.loads(p.train["messages"][0])[0]["content"] or "Item" in p.test["messages"][0]
    chat = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}"}]} for i in range(30)]
    p = prepare(DataConfig(source=write_jsonl(tmp_path / "c.jsonl", chat)), tokenizer)
    assert p.format == "chat"
    text = [{"text": f"Paragraph {i} about rivers and their deltas."} for i in range(30)]
    p = prepare(DataConfig(source=write_jsonl(tmp_path / "t.jsonl", text)), tokenizer)
    assert p.format == "text" and (p.train["n_trained_tokens"] == p.train["n_tokens"]).all()


def test_csv_and_parquet_sources(tokenizer, tmp_path):
    frame = pd.DataFrame(alpaca_rows(30))
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_parquet(tmp_path / "a.parquet")
    for f in ("a.csv", "a.parquet"):
        p = prepare(DataConfig(source=str(tmp_path / f)), tokenizer)
        assert len(p.train) + len(p.validation) + len(p.test) == 30


def test_bad_rows_are_dropped_and_counted_by_rule(tokenizer, tmp_path):
    rows = alpaca_rows(40)
    rows[3]["output"] = "   "
    rows[5]["instruction"] = ""
    rows[7] = dict(rows[6])  # duplicate of row 7 (1-based)
    rows[9]["output"] = "word " * 600
    p = prepare(DataConfig(source=write_jsonl(tmp_path / "a.jsonl", rows), max_length=256, max_drop_fraction=0.2), tokenizer)
    assert p.report.dropped == {"empty_completion": 1, "empty_prompt": 1, "duplicate": 1, "too_long": 1}
    assert p.report.rows_kept == 36
    cases = p.report.failure_cases
    assert set(cases["source_row"]) == {4, 6, 8, 10}


def test_fail_policy_names_rows_and_rules(tokenizer, tmp_path):
    rows = alpaca_rows(40)
    rows[3]["output"] = ""
    with pytest.raises(DataError, match=r"row 4: empty_completion"):
        prepare(DataConfig(source=write_jsonl(tmp_path / "a.jsonl", rows), on_invalid="fail"), tokenizer)


def test_never_trains_on_almost_nothing(tokenizer, tmp_path):
    rows = alpaca_rows(40)
    for r in rows[:35]:
        r["output"] = ""
    with pytest.raises(DataError, match="only 3 training rows remain"):
        prepare(DataConfig(source=write_jsonl(tmp_path / "a.jsonl", rows), max_drop_fraction=1.0), tokenizer)
    for r in rows:
        r["output"] = ""
    with pytest.raises(DataError, match="all 40 rows .* are invalid"):
        prepare(DataConfig(source=write_jsonl(tmp_path / "a.jsonl", rows)), tokenizer)


def test_unreadable_inputs_give_clear_errors(tokenizer, tmp_path):
    with pytest.raises(DataError, match="file not found"):
        prepare(DataConfig(source=str(tmp_path / "missing.jsonl")), tokenizer)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=r"not UTF-8 .* line 1"):
        prepare(DataConfig(source=str(bad)), tokenizer)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match="line 2"):
        prepare(DataConfig(source=str(broken)), tokenizer)
    chat = [{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    with pytest.raises(DataError, match=r"row 1, column messages, message 0: unknown role 'wizard'"):
        prepare(DataConfig(source=write_jsonl(tmp_path / "c.jsonl", chat)), tokenizer)

"""Labelled single answers for KTO (data.format: unpaired): shapes, label spellings, the pandera rules,
the splits, the token rows, and data of the wrong kind refused before training."""

import json

import pandas as pd
import pytest

from llm_finetune.config import EMBEDDED_UNPAIRED_DATASET, DataConfig
from llm_finetune.data import iso_dates_preference, iso_dates_unpaired as gen
from llm_finetune.data.prepare import prepare
from llm_finetune.data.unpaired import parse_label
from llm_finetune.errors import DataError

ROWS = [("Rewrite 5 March 2021 in ISO 8601.", "2021-03-05", True), ("Rewrite 7 June 1999 in ISO 8601.", "06/07/1999", False),
        ("Rewrite 9 May 2010 in ISO 8601.", "2010-05-09", True), ("Rewrite 1 July 2001 in ISO 8601.", "July 1st", False),
        ("Rewrite 2 July 2002 in ISO 8601.", "2002-07-02", True), ("Rewrite 3 July 2003 in ISO 8601.", "3/7/2003", False)]


def _write(tmp_path, rows, name="feedback.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(source, **kw):
    return DataConfig(source=source, **{"test_fraction": 0.34, "validation_fraction": 0.17, "min_train_rows": 1, **kw})


def test_embedded_set_is_the_generator_output_one_rated_answer_per_prompt():
    assert gen.SHIPPED_FILE.read_text(encoding="utf-8") == gen.to_jsonl(gen.generate())
    rows = [json.loads(line) for line in gen.SHIPPED_FILE.read_text().splitlines()]
    pairs = {p["prompt"]: p for p in iso_dates_preference.generate()}
    assert len(rows) == 1000 and len({r["prompt"] for r in rows}) == 1000  # unpaired: no prompt answered twice
    for r in rows:  # a thumbs up is the pair's right answer, a thumbs down its wrong one
        assert r["completion"] == pairs[r["prompt"]]["chosen" if r["label"] else "rejected"]
    assert 400 < sum(r["label"] for r in rows) < 600


@pytest.mark.parametrize("value, want", [(True, True), (False, False), (1, True), (0, False), ("yes", True), ("No", False),
                                         ("thumbs_up", True), ("down", False), ("GOOD", True), ("bad", False),
                                         ("maybe", None), (2, None), (None, None), (float("nan"), None)])
def test_label_spellings(value, want):
    assert parse_label(value) is want


def test_rows_split_encode_and_score_like_sft(tokenizer, tmp_path):
    source = _write(tmp_path, [{"prompt": q, "completion": a, "label": lab} for q, a, lab in ROWS])
    prepared = prepare(_cfg(source), tokenizer, kind="unpaired")
    assert prepared.format == "unpaired" and "auto-detected" in prepared.format_reason
    parts = [prepared.train, prepared.validation]
    assert sum(map(len, parts)) + len(prepared.test) >= len(ROWS) - 2  # test holds only desirable answers (scored)
    # token rows are the chat template's rendering of prompt and answer, ending at the end-of-turn token
    for tokens in prepared.train_tokens.itertuples():
        q, a, lab = next(r for r in ROWS if r[1] == prepared.train.set_index("source_row").loc[tokens.source_row, "completion"])
        assert tokens.label == lab
        assert tokenizer.decode(tokens.prompt_ids) == tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False)
        assert tokenizer.decode(list(tokens.prompt_ids) + list(tokens.completion_ids)) == rendered.removesuffix("\n")
    # the test split is the desirable held-out answers as SFT rows: evaluation scores them like any SFT test set
    assert len(prepared.test) >= 1 and {"messages", "input_ids", "labels"} <= set(prepared.test.columns)
    for m in prepared.test["messages"]:
        answer = json.loads(m)[-1]["content"]
        assert any(a == answer and lab for _, a, lab in ROWS)


def test_every_rule_drops_and_counts_its_rows(tokenizer, tmp_path):
    good = [{"prompt": f"Rewrite {d} May 2010 in ISO 8601.", "completion": f"2010-05-{d:02d}", "label": d % 2 == 0} for d in range(1, 21)]
    bad = [
        {"prompt": "", "completion": "2010-05-01", "label": True},  # empty_prompt
        {"prompt": "Rewrite 1 May 2011.", "completion": " ", "label": True},  # empty_completion
        {"prompt": "Rewrite 2 May 2011.", "completion": "2011-05-02", "label": "maybe"},  # label_not_boolean
        {"prompt": "Rewrite 3 May 2011.", "completion": "2011-05-03", "label": True},
        {"prompt": "Rewrite 3 May 2011.", "completion": "2011-05-03", "label": False},  # conflicting_label (both rows)
        dict(good[0]),  # duplicate
    ]
    prepared = prepare(_cfg(_write(tmp_path, good + bad), max_drop_fraction=0.5), tokenizer, kind="unpaired")
    assert prepared.report.dropped == {"empty_prompt": 1, "empty_completion": 1, "label_not_boolean": 1,
                                       "conflicting_label": 2, "duplicate": 1}
    cases = prepared.report.failure_cases
    assert set(cases[cases["rule"] == "conflicting_label"]["source_row"]) == {24, 25}
    assert cases[cases["rule"] == "label_not_boolean"]["column"].tolist() == ["label"]
    with pytest.raises(DataError, match=r"(?s)is 'fail' and 6 of 26 labelled answers.*row 23, column label: label_not_boolean"):
        prepare(_cfg(_write(tmp_path, good + bad), on_invalid="fail"), tokenizer, kind="unpaired")


def test_one_label_only_is_refused_with_the_fix(tokenizer, tmp_path):
    rows = [{"prompt": f"Rewrite {d} May 2010 in ISO 8601.", "completion": f"2010-05-{d:02d}", "label": True} for d in range(1, 21)]
    with pytest.raises(DataError, match="0 undesirable.*KTO needs at least data.min_train_rows=1 rows with both labels"):
        prepare(_cfg(_write(tmp_path, rows)), tokenizer, kind="unpaired")


def test_missing_columns_name_the_mapping(tokenizer, tmp_path):
    source = _write(tmp_path, [{"prompt": q, "answer": a, "thumbs": lab} for q, a, lab in ROWS])
    with pytest.raises(DataError, match=r"needs columns prompt, completion and label, but completion, label missing.*data.columns"):
        prepare(_cfg(source, format="unpaired"), tokenizer, kind="unpaired")
    mapped = prepare(_cfg(source, columns={"completion": "answer", "label": "thumbs"}), tokenizer, kind="unpaired")
    assert mapped.format == "unpaired"


@pytest.mark.parametrize("source, kind, found, methods", [
    (EMBEDDED_UNPAIRED_DATASET, "sft", "unpaired", "kto"),
    ("embedded://iso_dates_preference", "unpaired", "preference", "dpo or orpo"),
    ("embedded://iso_dates", "preference", "sft", "sft"),
])
def test_data_of_another_kind_is_refused_naming_the_methods_that_take_it(tokenizer, source, kind, found, methods):
    with pytest.raises(DataError, match=fr"holds {found} rows .* which train with train.method {methods}; the configured method needs {kind} rows"):
        prepare(DataConfig(source=source), tokenizer, kind=kind)


def test_training_order_is_shuffled_by_the_seed_and_reproducible(tokenizer):
    """KTO's KL term pairs neighbouring rows and TRL reads them in order: rows must not arrive sorted by source."""
    a = prepare(DataConfig(source=EMBEDDED_UNPAIRED_DATASET), tokenizer, kind="unpaired").train_tokens
    b = prepare(DataConfig(source=EMBEDDED_UNPAIRED_DATASET), tokenizer, kind="unpaired").train_tokens
    pd.testing.assert_frame_equal(a, b)
    assert list(a["source_row"]) != sorted(a["source_row"])
    other = prepare(DataConfig(source=EMBEDDED_UNPAIRED_DATASET, seed=7), tokenizer, kind="unpaired").train_tokens
    assert list(other["source_row"]) != list(a["source_row"])

"""Preference pairs: the accepted shapes, the pandera rules, malformed data refused by row and column."""

import datetime as dt
import json

import pandas as pd
import pytest

from llm_finetune.config import DataConfig
from llm_finetune.data import iso_dates_preference as gen
from llm_finetune.data.prepare import prepare
from llm_finetune.errors import DataError

PAIRS = [("Rewrite 5 March 2021 in ISO 8601.", "2021-03-05", "March 5, 2021"),
         ("Rewrite 7 June 1999 in ISO 8601.", "1999-06-07", "06/07/1999"),
         ("Rewrite 9 May 2010 in ISO 8601.", "2010-05-09", "May 9th 2010")]


def _user(q):
    return {"role": "user", "content": q}


def _bot(a):
    return {"role": "assistant", "content": a}


SHAPES = {
    "flat": lambda q, c, r: {"prompt": q, "chosen": c, "rejected": r},
    "ultrafeedback": lambda q, c, r: {"prompt": q, "chosen": [_user(q), _bot(c)], "rejected": [_user(q), _bot(r)]},
    "explicit-prompt": lambda q, c, r: {"prompt": [_user(q)], "chosen": [_bot(c)], "rejected": [_bot(r)]},
    "hh-rlhf": lambda q, c, r: {"chosen": [_user(q), _bot(c)], "rejected": [_user(q), _bot(r)]},
    "hh-raw": lambda q, c, r: {"chosen": f"\n\nHuman: {q}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {r}"},
}


def _write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(source, **kw):
    return DataConfig(source=source, **{"test_fraction": 0.3, "validation_fraction": 0.3, "min_train_rows": 1, **kw})


def _canonical(prepared) -> list[tuple]:
    both = pd.concat([prepared.train, prepared.validation, prepared.test]).sort_values("source_row")
    return [(json.loads(r.prompt), r.chosen, r.rejected) for r in both.itertuples()]


def test_embedded_pairs_are_the_generator_output_and_correct():
    assert gen.SHIPPED_FILE.read_text(encoding="utf-8") == gen.to_jsonl(gen.generate())
    rows = [json.loads(line) for line in gen.SHIPPED_FILE.read_text().splitlines()]
    assert len(rows) == 1000 and len({r["chosen"] for r in rows}) == len(rows)
    for r in rows:
        date = dt.date.fromisoformat(r["chosen"])  # the chosen answer is a real ISO date ...
        assert str(date.year) in r["prompt"].split("\n\n")[-1]  # ... of the date in the prompt
        assert r["rejected"] != r["chosen"]


@pytest.mark.parametrize("shape", SHAPES)
def test_auto_recognises_every_shape(shape, tokenizer, tmp_path):
    source = _write(tmp_path, [SHAPES[shape](*p) for p in PAIRS])
    prepared = prepare(_cfg(source), tokenizer)
    assert prepared.format == "preference" and "auto-detected" in prepared.format_reason
    assert _canonical(prepared) == [([_user(q)], c, r) for q, c, r in PAIRS]
    assert len(prepared.train_tokens) == len(prepared.validation) == len(prepared.test) == 1


def test_token_rows_are_the_chat_template_rendering(tokenizer, tmp_path):
    prepared = prepare(_cfg(_write(tmp_path, [SHAPES["flat"](*p) for p in PAIRS])), tokenizer)
    row = prepared.train_tokens.iloc[0]
    q, c, r = next(p for p in PAIRS if p[1] == prepared.train.iloc[0]["chosen"])
    prompt = tokenizer.apply_chat_template([_user(q)], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(row["prompt_ids"]) == prompt
    # the answer ends exactly at the end-of-turn token: the template's trailing newline is not trained (issue 15)
    for answer, ids in ((c, row["chosen_ids"]), (r, row["rejected_ids"])):
        rendered = tokenizer.apply_chat_template([_user(q), _bot(answer)], tokenize=False)
        assert rendered.endswith("<|im_end|>\n")
        assert tokenizer.decode(list(row["prompt_ids"]) + list(ids)) == rendered[: -len("\n")]


BROKEN = [
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "empty_prompt", "prompt"),
    ({"prompt": "q3", "chosen": "", "rejected": "b"}, "empty_chosen", "chosen"),
    ({"prompt": "q4", "chosen": "a", "rejected": None}, "empty_rejected", "rejected"),
    ({"prompt": "q5", "chosen": "same", "rejected": "same "}, "chosen_equals_rejected", "chosen, rejected"),
    ({"prompt": "q6", "chosen": [_user("q6"), _bot("a")], "rejected": [_user("another question"), _bot("b")]},
     "prompt_not_shared", "prompt, chosen, rejected"),
    ({"prompt": "q7 " + "long " * 300, "chosen": "a", "rejected": "b"}, "too_long", "prompt, chosen, rejected"),
]


def _broken_source(tmp_path):
    good = [SHAPES["flat"](*p) for p in PAIRS]
    rows = [good[0], *[b for b, _, _ in BROKEN], good[1], good[0], good[2]]  # row 9 duplicates row 1
    return _write(tmp_path, rows)


def test_rules_drop_and_count_rows_like_sft(tokenizer, tmp_path):
    # 7 of 10 pairs break a rule: more than data.max_drop_fraction (5%), as for SFT rows, fails the run ...
    with pytest.raises(DataError, match=r"data.max_drop_fraction: 7 of 10 rows .* \(70.0%\) would be dropped"):
        prepare(_cfg(_broken_source(tmp_path), max_length=256), tokenizer)
    # ... unless the user accepts the loss
    prepared = prepare(_cfg(_broken_source(tmp_path), max_length=256, max_drop_fraction=1.0), tokenizer)
    r = prepared.report
    assert (r.rows_in, r.rows_kept) == (10, 3)
    assert r.dropped == {rule: 1 for _, rule, _ in BROKEN} | {"duplicate": 1}
    cases = r.failure_cases.set_index("source_row")
    for i, (_, rule, column) in enumerate(BROKEN, start=2):
        assert (cases.loc[i, "rule"], cases.loc[i, "column"]) == (rule, column)
    assert cases.loc[9, "rule"] == "duplicate"


def test_fail_policy_names_row_column_and_rule(tokenizer, tmp_path):
    with pytest.raises(DataError) as e:
        prepare(_cfg(_broken_source(tmp_path), max_length=256, on_invalid="fail"), tokenizer)
    msg = str(e.value)
    assert "7 of 10 preference pairs" in msg and "set data.on_invalid: drop" in msg
    assert "row 5, column chosen, rejected: chosen_equals_rejected" in msg
    assert "row 6, column prompt, chosen, rejected: prompt_not_shared" in msg
    assert "row 2, column prompt: empty_prompt" in msg


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([{"prompt": "q", "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}],
         "row 1, column chosen, message 0: unknown role 'bot'"),
        ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": [_user("q"), _user("x")]}],
         "row 2, column rejected: the last message must be the assistant's answer"),
        ([{"prompt": "q", "chosen": [{"text": "a"}], "rejected": "b"}], "row 1, column chosen, message 0: expected an object with 'role'"),
        ([{"prompt": "q", "chosen": 5, "rejected": "b"}], "row 1, column chosen: expected a string or a list"),
        ([{"chosen": "a", "rejected": "b"}], "row 1, column prompt: missing"),
    ],
    ids=["unknown-role", "last-turn-not-assistant", "not-a-message", "not-text", "no-prompt"],
)
def test_malformed_pairs_are_refused_with_row_and_column(rows, needle, tokenizer, tmp_path):
    with pytest.raises(DataError, match=None) as e:
        prepare(_cfg(_write(tmp_path, rows)), tokenizer)
    assert needle in str(e.value)


def test_format_preference_without_pairs_names_missing_column(tokenizer, tmp_path):
    with pytest.raises(DataError, match="needs columns chosen and rejected .* rejected missing"):
        prepare(_cfg(_write(tmp_path, [{"prompt": "q", "chosen": "a"}]), format="preference"), tokenizer)


def _long_pairs(tmp_path, n_pad_words: int, answer_words: int = 0):
    """Pairs whose prompt carries ``n_pad_words`` words of context before the question; answers padded too."""
    pad = " ".join(["context"] * n_pad_words)
    tail = " ".join(["word"] * answer_words)
    rows = [{"prompt": f"{pad} (case {i}) {q}", "chosen": f"{c} {tail}".strip(), "rejected": f"{r} {tail}".strip()}
            for i, (q, c, r) in enumerate(PAIRS * 4)]
    return _write(tmp_path, rows, f"long-{n_pad_words}-{answer_words}.jsonl")


def test_truncate_prompt_cuts_the_prompt_from_the_left_and_keeps_the_answers_whole(tokenizer, tmp_path):
    source = _long_pairs(tmp_path, 150)
    full = prepare(_cfg(source, max_length=512), tokenizer).train_tokens
    cut = prepare(_cfg(source, max_length=64, overlong="truncate_prompt"), tokenizer)
    assert cut.truncated_rows == len(cut.train_tokens) > 0 and cut.report.rows_kept == cut.report.rows_in
    whole = {r.source_row: r for r in full.itertuples()}
    for r in cut.train_tokens.itertuples():
        ref = whole[r.source_row]
        assert list(r.chosen_ids) == list(ref.chosen_ids) and list(r.rejected_ids) == list(ref.rejected_ids)  # EOS kept
        assert list(r.chosen_ids)[-1] == list(ref.chosen_ids)[-1]
        room = 64 - max(len(r.chosen_ids), len(r.rejected_ids))
        assert list(r.prompt_ids) == list(ref.prompt_ids)[-room:]  # the end of the prompt: the question stays
        assert len(r.prompt_ids) + max(len(r.chosen_ids), len(r.rejected_ids)) == 64


def test_a_pair_whose_answer_alone_fills_max_length_is_dropped_and_counted(tokenizer, tmp_path):
    short = [json.loads(line) for line in open(_long_pairs(tmp_path, 150))]
    long = [json.loads(line) for line in open(_long_pairs(tmp_path, 0, answer_words=80))]
    source = _write(tmp_path, short + long[:3], "mixed.jsonl")  # 3 of 15 pairs: answers longer than max_length
    with pytest.raises(DataError, match=r"(?s)max_drop_fraction: 3 of 15 rows .*answers_too_long: 3 rows \(the longer answer "
                                        r"alone leaves no room.*fix: raise data.max_length"):
        prepare(_cfg(source, max_length=64, overlong="truncate_prompt"), tokenizer)
    kept = prepare(_cfg(source, max_length=64, overlong="truncate_prompt", max_drop_fraction=0.25), tokenizer)
    assert kept.report.dropped == {"answers_too_long": 3} and kept.report.rows_kept == 12
    cases = kept.report.failure_cases
    assert sorted(cases["source_row"]) == [13, 14, 15] and set(cases["column"]) == {"chosen, rejected"}


def test_overlong_fail_names_the_pairs(tokenizer, tmp_path):
    with pytest.raises(DataError) as e:
        prepare(_cfg(_long_pairs(tmp_path, 150), max_length=64, overlong="fail"), tokenizer)
    text = str(e.value)
    assert "data.overlong is 'fail' and 12 of 12 preference pairs" in text and "longer than max_length 64" in text
    assert "row 1, column prompt, chosen, rejected: too_long" in text and "set data.overlong: drop or truncate_prompt" in text


def test_the_validation_deck_counts_every_dropped_and_cut_pair_by_reason(tokenizer, tmp_path):
    """12 pairs whose 150-word context overflows 64 tokens (kept, prompt cut), 3 whose answers alone do (dropped),
    1 exact duplicate (dropped): the deck's table, read back as HTML, says so reason by reason."""
    import io

    from tasks.preference_data import preference_decks

    short = [json.loads(line) for line in open(_long_pairs(tmp_path, 150))]
    long = [json.loads(line) for line in open(_long_pairs(tmp_path, 0, answer_words=80))]
    source = _write(tmp_path, short + long[:3] + short[:1], "mixed-dup.jsonl")
    data = _cfg(source, max_length=64, overlong="truncate_prompt", max_drop_fraction=0.3)
    prepared = prepare(data, tokenizer)
    table = pd.read_html(io.StringIO(preference_decks(prepared, data)["Validation"]))[0].set_index("reason")
    assert table.loc["answers_too_long", "pairs dropped"] == 3 and table.loc["duplicate", "pairs dropped"] == 1
    # every kept training pair carried the 150-word context, so every one of them was cut
    assert table.loc["prompt_cut", "pairs cut"] == len(prepared.train) > 0
    assert table["pairs dropped"].sum() == 16 - 12 == prepared.report.rows_in - prepared.report.rows_kept

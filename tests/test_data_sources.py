"""Where data comes from and how odd shapes become training rows (local files only)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from llm_finetune.config import DataConfig
from llm_finetune.data.prepare import prepare
from llm_finetune.errors import DataError

SEED_TASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_seed_tasks.jsonl"


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa(prefix, n):
    return [{"instruction": f"{prefix}: what is {i} + {i}?", "input": "", "output": str(2 * i)} for i in range(n)]


def test_dataset_repository_with_configs_and_splits(tokenizer, tmp_path):
    """A dataset repo on disk goes through the same datasets.load_dataset path as a hub id."""
    repo = tmp_path / "my-dataset"
    write_jsonl(repo / "easy" / "train.jsonl", qa("easy-train", 40))
    write_jsonl(repo / "easy" / "test.jsonl", qa("easy-test", 20))
    write_jsonl(repo / "hard" / "train.jsonl", qa("hard-train", 30))
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: easy\n  data_files:\n  - split: train\n    path: easy/train.jsonl\n"
        "  - split: test\n    path: easy/test.jsonl\n"
        "- config_name: hard\n  data_files:\n  - split: train\n    path: hard/train.jsonl\n---\n"
    )
    p = prepare(DataConfig(source=str(repo), subset="easy", split="test", min_train_rows=8), tokenizer)
    assert len(p.train) + len(p.validation) + len(p.test) == 20
    assert all("easy-test" in m for m in pd.concat([p.train, p.validation, p.test])["messages"])
    p = prepare(DataConfig(source=str(repo), subset="hard", split="train"), tokenizer)
    assert len(p.train) + len(p.validation) + len(p.test) == 30
    with pytest.raises(DataError, match=r"cannot load hub dataset .*split=validation.*data.split"):
        prepare(DataConfig(source=str(repo), subset="hard", split="validation"), tokenizer)


def test_hub_id_that_cannot_be_reached_says_what_to_check(tokenizer):
    with pytest.raises(DataError, match=r"cannot load hub dataset 'nobody/no-such-dataset'.*HF_TOKEN"):
        prepare(DataConfig(source="nobody/no-such-dataset"), tokenizer)


@pytest.mark.skipif(not SEED_TASKS.is_file(), reason="external test data ../shared/data is not present")
def test_nested_alpaca_seed_tasks_via_explode_and_mapping(tokenizer):
    """Alpaca's 175 seed tasks nest their examples: instances: [{input, output}]."""
    cfg = DataConfig(
        source=str(SEED_TASKS),
        explode="instances",
        columns={"input": "instances.input", "output": "instances.output"},
        max_length=512,
    )
    p = prepare(cfg, tokenizer)
    assert p.format == "alpaca"
    assert p.report.rows_in == 175
    assert p.report.rows_kept + sum(p.report.dropped.values()) == 175
    first = json.loads(pd.concat([p.train, p.validation, p.test]).sort_values("source_row")["messages"].iloc[0])
    assert first[0]["content"].startswith("Is there anything I can eat for a breakfast")
    assert first[1]["content"].startswith("Yes, you can have 1 oatmeal banana protein shake")
    # without the explode the mapping cannot find the nested fields and says how to fix it
    with pytest.raises(DataError, match="set data.explode"):
        prepare(DataConfig(source=str(SEED_TASKS), columns={"output": "instances.output"}), tokenizer)


def test_nested_mapping_without_lists(tokenizer, tmp_path):
    rows = [{"q": {"text": f"Name the number {i}."}, "a": {"text": str(i)}} for i in range(30)]
    src = write_jsonl(tmp_path / "nested.jsonl", rows)
    p = prepare(DataConfig(source=str(src), columns={"instruction": "q.text", "output": "a.text"}), tokenizer)
    assert p.format == "alpaca" and len(p.train) + len(p.validation) + len(p.test) == 30


def test_explode_errors_name_the_column_and_row(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a", "instances": "not a list"}])
    with pytest.raises(DataError, match=r"data.explode: row 1, column instances: expected a list"):
        prepare(DataConfig(source=str(src), explode="instances"), tokenizer)
    with pytest.raises(DataError, match=r"data.explode: column 'items' is not in the data"):
        prepare(DataConfig(source=str(src), explode="items"), tokenizer)


def test_row_far_over_max_length(tokenizer, tmp_path):
    rows = qa("long", 40)
    rows[12]["output"] = "lorem ipsum " * 2000
    src = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError, match=r"row 13: too_long .*: \d+ tokens, max_length is 128; .*data.overlong: truncate_prompt"):
        prepare(DataConfig(source=str(src), max_length=128, on_invalid="fail"), tokenizer)
    dropped = prepare(DataConfig(source=str(src), max_length=128), tokenizer)
    assert dropped.report.dropped == {"too_long": 1} and dropped.truncated_rows == 0
    # the deprecated truncation: true means overlong: truncate_prompt, which never cuts a completion
    cut = prepare(DataConfig(source=str(src), max_length=128, truncation=True), tokenizer)
    assert cut.report.dropped == {"too_long": 1} and cut.truncated_rows == 0
    assert cut.lengths.max() > 4000  # the profile still shows the length as read
    assert cut.train_tokens["input_ids"].map(len).max() <= 128


def test_packed_rows_hold_every_training_token_once(tokenizer):
    plain = prepare(DataConfig(max_length=512), tokenizer)
    packed = prepare(DataConfig(max_length=512, packing=True), tokenizer)
    assert len(plain.train_tokens) == len(plain.train)
    assert len(packed.train_tokens) < len(plain.train_tokens) / 5  # ~70-token examples: ~7 per 512-token row
    assert packed.packing_efficiency > 0.9 > 0.2 > plain.packing_efficiency
    assert packed.train_tokens["input_ids"].map(len).max() <= 512
    assert (packed.train_tokens["input_ids"].map(len) == packed.train_tokens["seq_lens"].map(sum)).all()
    rows = sorted(r for rs in packed.train_tokens["source_rows"] for r in rs)
    assert rows == sorted(plain.train["source_row"])
    trained = lambda f: sum(sum(x != -100 for x in labels) for labels in f["labels"])  # noqa: E731
    assert trained(packed.train_tokens) == trained(plain.train_tokens)


def test_prepared_outputs_are_byte_identical(tokenizer, tmp_path):
    cfg = DataConfig(max_length=256, packing=True)
    for name in ("a", "b"):
        p = prepare(cfg, tokenizer)
        p.train_tokens.to_parquet(tmp_path / f"{name}-tokens.parquet")
        p.validation.to_parquet(tmp_path / f"{name}-validation.parquet")
        p.test.to_parquet(tmp_path / f"{name}-test.parquet")
    for part in ("tokens", "validation", "test"):
        assert (tmp_path / f"a-{part}.parquet").read_bytes() == (tmp_path / f"b-{part}.parquet").read_bytes()


def test_unreadable_files_name_the_file_and_the_problem(tokenizer, tmp_path):
    corrupt = tmp_path / "rows.parquet"
    corrupt.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError, match=r"rows.parquet is not a readable parquet file"):
        prepare(DataConfig(source=str(corrupt)), tokenizer)
    with pytest.raises(DataError, match=r"has suffix .txt; supported files are .jsonl, .json, .csv, .parquet"):
        prepare(DataConfig(source=str(tmp_path / "rows.txt")), tokenizer)
    folder = tmp_path / "empty-folder"
    folder.mkdir()
    with pytest.raises(DataError, match=r"cannot load hub dataset .*empty-folder"):
        prepare(DataConfig(source=str(folder)), tokenizer)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"prompt": "a", "reply": "b"}\n')
    with pytest.raises(DataError, match=r"cannot tell the format from columns prompt, reply.*data.columns"):
        prepare(DataConfig(source=str(wrong)), tokenizer)

"""Three-way split: sizes, determinism, and prompts that never cross splits."""

import json

from llm_finetune.config import DataConfig
from llm_finetune.data.prepare import prepare


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def user_text(messages: str) -> str:
    return next(m["content"] for m in json.loads(messages) if m["role"] == "user")


def test_duplicate_prompts_stay_in_one_split(tokenizer, tmp_path):
    # 60 prompts, each answered three different ways: 180 distinct rows sharing prompts
    rows = [{"instruction": f"Name a colour for item {i}.", "input": "", "output": c} for i in range(60) for c in ("red", "green", "blue")]
    src = write_jsonl(tmp_path / "dup.jsonl", rows)
    for seed in (1, 2, 3):
        p = prepare(DataConfig(source=src, seed=seed, test_fraction=0.2, validation_fraction=0.1), tokenizer)
        splits = {name: set(map(user_text, getattr(p, name)["messages"])) for name in ("train", "validation", "test")}
        assert splits["train"].isdisjoint(splits["test"]) and splits["train"].isdisjoint(splits["validation"])
        assert splits["validation"].isdisjoint(splits["test"])
        assert len(p.train) + len(p.validation) + len(p.test) == 180
        assert 36 <= len(p.test) <= 39 and 18 <= len(p.validation) <= 21  # whole groups of 3 fill 20% / 10%
        assert all(len(getattr(p, n)) % 3 == 0 for n in ("train", "validation", "test"))


def test_split_follows_a_seeded_hash_not_row_order(tokenizer, tmp_path):
    rows = [{"instruction": f"Echo {i}.", "input": "", "output": str(i)} for i in range(200)]
    a = prepare(DataConfig(source=write_jsonl(tmp_path / "a.jsonl", rows)), tokenizer)
    b = prepare(DataConfig(source=write_jsonl(tmp_path / "b.jsonl", rows[::-1])), tokenizer)
    assert sorted(map(user_text, a.test["messages"])) == sorted(map(user_text, b.test["messages"]))
    # not by position either: the held-out rows are spread over the file, not its head or tail
    test_ids = [int(user_text(m).split()[1].rstrip(".")) for m in a.test["messages"]]
    assert len(test_ids) == 20 and 50 < sum(test_ids) / 20 < 150 and max(test_ids) - min(test_ids) > 100
    assert len(a.validation) == 10 and not set(a.validation["source_row"]) & set(a.test["source_row"])
    # the seed chooses the split: other seeds, other test rows (each a 20-of-200 draw)
    others = [set(map(user_text, prepare(DataConfig(source=write_jsonl(tmp_path / "a.jsonl", rows), seed=s), tokenizer).test["messages"]))
              for s in (1, 2)]
    assert set(map(user_text, a.test["messages"])) not in others and others[0] != others[1]

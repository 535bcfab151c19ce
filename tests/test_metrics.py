"""Task metrics and their bootstrap intervals, against independent computations."""

import json

import numpy as np
import pytest

from llm_finetune.evaluation.metrics import bootstrap_interval, row_scores, score, task_kind


@pytest.mark.parametrize("p, n", [(0.9, 50), (0.6, 120), (0.97, 200)])
def test_bootstrap_interval_matches_scipy(p, n):
    from scipy.stats import bootstrap

    x = (np.random.default_rng(1).random(n) < p).astype(float)
    ours = bootstrap_interval(x, n_resamples=4000, seed=3)
    ref = bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=4000, method="percentile", random_state=5).confidence_interval
    assert ours[0] == pytest.approx(ref.low, abs=0.02) and ours[1] == pytest.approx(ref.high, abs=0.02)
    assert ours[0] <= x.mean() <= ours[1]


def test_bootstrap_interval_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    true, n, trials = 0.7, 100, 300
    hits = 0
    for t in range(trials):
        low, high = bootstrap_interval((rng.random(n) < true).astype(float), n_resamples=1000, seed=t)
        hits += low <= true <= high
    assert 0.90 <= hits / trials <= 0.99  # the percentile bootstrap is slightly liberal at n=100


def test_kind_follows_the_references():
    assert task_kind(['{"a": 1}', '{"a": 2}', "[1, 2]"], 8) == "json"
    assert task_kind(["2021-03-05", "1999-12-31"], 8) == "exact_match"
    assert task_kind(["The river carries sediment to the sea where it forms a wide delta over time."] * 3, 8) == "chrf"


def test_json_metrics():
    refs = [json.dumps({"name": "Ana", "items": ["lamp"]})] * 4
    preds = [
        '{"items": ["lamp"], "name": "Ana"}',  # same value, other key order: exact and structural
        '{"name": "Ben", "items": ["desk", "tent"]}',  # same structure, other values
        '{"name": "Ana"}',  # valid JSON, missing a key
        "name: Ana",  # not JSON
    ]
    s = row_scores("json", preds, refs)
    assert s["valid_json"] == [1, 1, 1, 0]
    assert s["json_structure"] == [1, 1, 0, 0]
    assert s["json_exact"] == [1, 0, 0, 0]
    assert s["exact_match"] == [0, 0, 0, 0]
    summary = score("json", preds, refs)
    assert summary["valid_json"].value == 0.75 and summary["valid_json"].low <= 0.75 <= summary["valid_json"].high


def test_json_field_f1_counts_fields_by_their_values():
    """Hand-counted (key path, value) leaves: F1 = 2 * shared / (predicted + reference leaves)."""
    ref = json.dumps({"name": "Ana Lopez", "age": 31, "city": "Lima", "tags": ["vip", "new"], "address": {"zip": "15001"}})
    preds = [
        # same values, other order, other whitespace, 31.0 for 31, tags reordered: all 6 leaves shared
        '{"tags": ["new", "vip"], "age": 31.0, "address": {"zip": "15001"}, "city": "Lima", "name": "Ana  Lopez"}',
        # right keys, one wrong value (city) and age as a string: 4 of 6 shared -> 2*4/12
        '{"name": "Ana Lopez", "age": "31", "city": "Cusco", "tags": ["vip", "new"], "address": {"zip": "15001"}}',
        # half the fields, all right: 3 predicted, 6 reference, 3 shared -> 2*3/9
        '{"name": "Ana Lopez", "age": 31, "city": "Lima"}',
        # an extra field and a repeated tag: 8 predicted, 6 reference, 6 shared -> 12/14
        '{"name": "Ana Lopez", "age": 31, "city": "Lima", "tags": ["vip", "new", "vip"], "address": {"zip": "15001"}, "x": 1}',
        "not json",
    ]
    f1 = row_scores("json", preds, [ref] * len(preds))["json_field_f1"]
    assert f1 == pytest.approx([1.0, 8 / 12, 6 / 9, 12 / 14, 0.0])
    # the old headline scored the wrong-value row as a perfect structural match only when types agree;
    # field F1 tells a wrong value from a right one
    assert row_scores("json", [preds[1].replace('"31"', "31")], [ref])["json_structure"] == [1.0]
    assert row_scores("json", [preds[1].replace('"31"', "31")], [ref])["json_field_f1"] == [pytest.approx(10 / 12)]
    assert task_kind([ref] * 3, 8) == "json" and score("json", preds, [ref] * 5)["json_field_f1"].low <= 0.7


@pytest.mark.parametrize("references", [
    ["2021-03-05", "1999-12-31", "2004-02-29"],  # short answers
    [json.dumps({"id": i, "items": [{"sku": f"A{i}", "qty": i}], "note": None, "ok": True}) for i in range(5)],  # JSON
    ["The river carries sediment to the sea, where it settles into a wide delta.",
     "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen over many small steps."],  # free text
])
def test_references_scored_against_themselves_score_one_on_every_metric(references):
    kind = task_kind(references, 8)
    for name, s in score(kind, references, references).items():
        assert s.value == 1.0 and s.low == s.high == 1.0, name


def test_chrf_is_sacrebleus_chrf():
    from sacrebleu.metrics import CHRF

    refs = ["the cat sat on the mat", "rivers carry sediment to the sea"]
    preds = ["the cat sat on a mat", "completely unrelated words here"]
    s = row_scores("chrf", preds, refs)["chrf"]
    assert s[0] == pytest.approx(CHRF().corpus_score([preds[0]], [[refs[0]]]).score / 100)
    assert row_scores("chrf", refs, refs)["chrf"] == [1.0, 1.0] and s[1] < 0.2 < s[0]


def test_evaluate_reports_every_metric_with_an_interval(tmp_path, tokenizer):
    """The scoring the evaluate task runs, on a tiny model and a JSON test split."""
    import pandas as pd

    from llm_finetune.config import DataConfig, EvalConfig
    from llm_finetune.evaluation.evaluate import evaluate
    from tests.tiny import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "m", tokenizer)
    conv = lambda i: json.dumps([{"role": "user", "content": f"Extract {i}"}, {"role": "assistant", "content": json.dumps({"id": i})}])  # noqa: E731
    frame = pd.DataFrame({"messages": [conv(i) for i in range(12)], "text": [""] * 12})
    metrics, table = evaluate(model_dir, frame, DataConfig(), EvalConfig(max_new_tokens=4, batch_size=6))
    assert metrics.task_kind == "json" and metrics.task_metric == "json_field_f1"
    assert set(metrics.scores) == {"exact_match", "valid_json", "json_field_f1", "json_structure", "json_exact"}
    # an explicit budget below the references: every tiny-model answer spends it and is counted as cut
    assert metrics.max_new_tokens == 4 and metrics.longest_reference_tokens > 4 and metrics.cut_predictions == 12
    for k, v in metrics.scores.items():
        assert metrics.scores_low[k] <= v <= metrics.scores_high[k]
    assert len(table) == 12

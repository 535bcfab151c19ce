"""Preference accuracy: log-probabilities of answers and the bootstrap intervals, against independent references."""

import numpy as np
import pytest
import torch

from llm_finetune.evaluation.preference_eval import answer_logps, bootstrap_interval, paired_difference
from tests.tiny import save_tiny_llama


def test_bootstrap_interval_matches_scipy():
    from scipy.stats import bootstrap

    x = (np.random.default_rng(3).random(200) < 0.7).astype(float)
    ref = bootstrap((x,), np.mean, method="percentile", n_resamples=5000, random_state=1).confidence_interval
    low, high = bootstrap_interval(x)
    assert low == pytest.approx(ref.low, abs=0.015) and high == pytest.approx(ref.high, abs=0.015)
    assert low < x.mean() < high


def test_paired_difference_uses_the_pairs():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(5)
    base = (rng.random(150) < 0.4).astype(float)
    tuned = np.where(rng.random(150) < 0.8, 1.0, base)  # mostly right, correlated with base
    gain, low, high = paired_difference(tuned, base)
    ref = bootstrap((tuned - base,), np.mean, method="percentile", n_resamples=5000, random_state=1).confidence_interval
    assert gain == pytest.approx((tuned - base).mean())
    assert low == pytest.approx(ref.low, abs=0.02) and high == pytest.approx(ref.high, abs=0.02)
    assert paired_difference(base, base) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same pairs"):
        paired_difference(tuned[:10], base)


def test_answer_logps_equal_the_models_own_loss(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path, tokenizer)).eval()
    g = torch.Generator().manual_seed(0)
    examples = [
        {"prompt_ids": torch.randint(5, 500, (n,), generator=g).tolist(), "chosen_ids": torch.randint(5, 500, (c,), generator=g).tolist(),
         "rejected_ids": torch.randint(5, 500, (r,), generator=g).tolist()}
        for n, c, r in [(7, 3, 5), (4, 6, 1), (11, 2, 2)]
    ]
    chosen, rejected = answer_logps(model, examples, tokenizer.pad_token_id, batch_size=4)  # padded batches
    for e, c, r in zip(examples, chosen, rejected):
        for answer, got in ((e["chosen_ids"], c), (e["rejected_ids"], r)):
            ids = torch.tensor([e["prompt_ids"] + answer])
            labels = torch.tensor([[-100] * len(e["prompt_ids"]) + answer])
            with torch.no_grad():
                mean_nll = model(input_ids=ids, labels=labels).loss  # HF's mean over the answer tokens
            assert got == pytest.approx(-float(mean_nll) * len(answer), rel=1e-4, abs=1e-4)

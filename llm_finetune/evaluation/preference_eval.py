"""Preference accuracy on held-out pairs: does the model give the chosen answer more probability?

For each held-out pair, the policy's log-probability of the chosen answer and of the
rejected one (summed over the answer's tokens, given the same prompt, rendered exactly as
in training) are compared; preference accuracy is the share of pairs where chosen wins.
This needs no reference model, so base, SFT, DPO and quantized models are scored the same
way and are comparable. A percentile bootstrap over pairs gives the 95% interval, and a
paired bootstrap gives the interval of the tuned-minus-base difference (the same pairs
score both models). Greedy generations of the same prompts go in the table, so the decks
show base and tuned answers side by side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llm_finetune.config import DataConfig, EvalConfig
from llm_finetune.evaluation.generation import generation_budget
from llm_finetune.data.preference import pair_examples, pair_sample_prompts as sample_prompts

BOOTSTRAP_SAMPLES = 2000


def bootstrap_interval(values, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling rows with replacement)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(samples, len(x)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_difference(tuned, base, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean(tuned - base), low, high): the paired bootstrap interval of the accuracy gain on the same pairs."""
    t, b = np.asarray(tuned, dtype=float), np.asarray(base, dtype=float)
    if len(t) != len(b):
        raise ValueError(f"paired comparison needs the same pairs: {len(t)} tuned rows vs {len(b)} base rows")
    low, high = bootstrap_interval(t - b, level, samples, seed)
    return float((t - b).mean()) if len(t) else math.nan, low, high


@torch.no_grad()
def answer_logps(model, examples: list[dict], pad_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probabilities of the chosen and of the rejected answer tokens, one per pair."""
    seqs, spans = [], []
    for e in examples:
        for key in ("chosen_ids", "rejected_ids"):
            seqs.append(e["prompt_ids"] + e[key])
            spans.append((len(e["prompt_ids"]), len(e["prompt_ids"]) + len(e[key])))
    out = np.zeros(len(seqs))
    for i in range(0, len(seqs), batch_size):
        batch, bspans = seqs[i : i + batch_size], spans[i : i + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, s in enumerate(batch):
            ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(model.device).unsqueeze(-1)).squeeze(-1)
        for j, (start, end) in enumerate(bspans):
            out[i + j] = float(logp[j, start - 1 : end - 1].sum())  # token t is predicted at position t-1
    return out[0::2], out[1::2]


def evaluate_preference(model_dir: str | Path, eval_frame: pd.DataFrame, data_cfg: DataConfig, cfg: EvalConfig, gguf_file: str = ""):
    """(EvalMetrics, table) for held-out preference pairs; the table has one row per pair."""
    from llm_finetune.evaluation.eval_models import eval_tokenizer, generate, load_model
    from llm_finetune.evaluation.metrics import EvalMetrics

    frame = eval_frame if cfg.max_samples == 0 else eval_frame.head(cfg.max_samples)
    tokenizer = eval_tokenizer(model_dir, gguf_file)
    model = load_model(model_dir, gguf_file)
    examples = pair_examples(tokenizer, frame, data_cfg)
    chosen, rejected = answer_logps(model, examples, tokenizer.pad_token_id, cfg.batch_size)
    prefers = chosen > rejected
    low, high = bootstrap_interval(prefers)
    prompts = sample_prompts(tokenizer, frame, data_cfg, len(frame))
    budget = generation_budget(tokenizer, [r for _, r in prompts], cfg.max_new_tokens)
    texts, cuts = generate(model, tokenizer, [p for p, _ in prompts], budget.max_new_tokens, cfg.generate_batch_size)
    predictions = [p.strip() for p in texts]
    n_chosen = sum(len(e["chosen_ids"]) for e in examples)
    loss = float(-chosen.sum() / max(n_chosen, 1))  # NLL per chosen-answer token
    table = pd.DataFrame({
        "prompt": [json.loads(p)[-1]["content"] if json.loads(p) else "" for p in frame["prompt"]],
        "reference": frame["chosen"].tolist(),
        "rejected": frame["rejected"].tolist(),
        "prediction": predictions,
        "correct": prefers.tolist(),  # the model prefers the chosen answer
        "logp_chosen": chosen.round(4).tolist(),
        "logp_rejected": rejected.round(4).tolist(),
        "logp_margin": (chosen - rejected).round(4).tolist(),
    })
    exact = float(np.mean([p == r.strip() for p, r in zip(predictions, table["reference"])])) if len(table) else 0.0
    metrics = EvalMetrics(
        rows=len(frame),
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        exact_match=exact,
        exact_match_rows=len(table),
        task_metric="preference_accuracy",
        median_reference_words=float(table["reference"].map(lambda r: len(str(r).split())).median()) if len(table) else 0.0,
        preference_accuracy=float(prefers.mean()) if len(prefers) else 0.0,
        preference_ci_low=low,
        preference_ci_high=high,
        mean_logp_margin=float((chosen - rejected).mean()) if len(prefers) else 0.0,
        max_new_tokens=budget.max_new_tokens,
        longest_reference_tokens=budget.longest_reference_tokens,
        cut_predictions=sum(cuts),
    )
    return metrics, table

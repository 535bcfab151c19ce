"""Score a model on the test split: completion loss / perplexity and the task metrics.

The same function scores the base model, the tuned model and every quantized variant,
with the same prompts, so the numbers are comparable. The task metrics fit the answers
(metrics.py): exact match for short answers, field-level F1 (json_field_f1), valid-JSON rate and exact match when
the references are JSON, chrF for free text; each with a bootstrap 95% interval.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import torch

from llm_finetune.training.collate import TokenCollator
from llm_finetune.config import DataConfig, EvalConfig
from llm_finetune.data.preference import is_preference_frame
from llm_finetune.encoding import IGNORE_INDEX, encode_frame, prompt_and_reference
from llm_finetune.evaluation.draft_answers import drafted_answers
from llm_finetune.data.lengths import model_context
from llm_finetune.evaluation.generation import generation_budget, stop_token_ids
from llm_finetune.evaluation.eval_models import eval_tokenizer, generate, load_model  # noqa: F401 - generate re-exported
from llm_finetune.evaluation.metrics import HEADLINE, EvalMetrics, score, task_kind  # noqa: F401 - EvalMetrics re-exported


@torch.no_grad()
def scoring_pass(model, examples: list[dict], pad_id: int, batch_size: int) -> tuple[float, list[list[int]]]:
    """Mean NLL per trained token, and the model's top token at every position of every row.

    The top tokens let ``draft_answers`` read greedy answers off this pass where the model
    reproduces the reference, instead of generating them.
    """
    collate = TokenCollator(pad_id)
    total, count, tops = 0.0, 0, []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = {k: v.to(model.device) for k, v in collate(chunk).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += float(nll)
        count += int((labels != IGNORE_INDEX).sum())
        top = logits.argmax(-1).tolist()
        tops += [row[: len(ex["input_ids"])] for row, ex in zip(top, chunk)]
    return total / max(count, 1), tops


def _context(model_dir: str | Path) -> int:
    config = Path(model_dir) / "config.json"
    return model_context(json.loads(config.read_text())) if config.is_file() else 0


def evaluate(
    model_dir: str | Path, eval_frame: pd.DataFrame, data_cfg: DataConfig, cfg: EvalConfig, gguf_file: str = ""
) -> tuple[EvalMetrics, pd.DataFrame]:
    """Metrics plus a per-row table (prompt, reference, prediction, correct) for decks."""
    if is_preference_frame(eval_frame):  # held-out chosen/rejected pairs: preference accuracy
        from llm_finetune.evaluation.preference_eval import evaluate_preference

        return evaluate_preference(model_dir, eval_frame, data_cfg, cfg, gguf_file)
    frame = eval_frame if cfg.max_samples == 0 else eval_frame.head(cfg.max_samples)
    tokenizer = eval_tokenizer(model_dir, gguf_file)
    examples = encode_frame(tokenizer, frame, data_cfg)
    instruction_rows = [json.loads(m) for m in frame["messages"] if m]
    pairs = [prompt_and_reference(tokenizer, conv, data_cfg.prompt_template) for conv in instruction_rows]
    prompts = [p for p, _ in pairs]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    budget = generation_budget(tokenizer, [r for _, r in pairs], cfg.max_new_tokens, _context(model_dir),
                               max((len(p) for p in prompt_ids), default=0))
    llm = None
    if gguf_file and importlib.util.find_spec("llama_cpp"):  # GGUF runs in llama.cpp (llm_finetune/evaluation/gguf_eval.py)
        from llm_finetune.evaluation import gguf_eval

        llm = gguf_eval.load(model_dir, gguf_file, n_ctx=max([len(e["input_ids"]) for e in examples] + [64]) + budget.max_new_tokens + 16)
        loss, tops = gguf_eval.scoring_pass(llm, examples)
        stops = gguf_eval.stop_ids(llm, tokenizer)
    else:
        model = load_model(model_dir, gguf_file)
        loss, tops = scoring_pass(model, examples, tokenizer.pad_token_id, cfg.batch_size)
        stops = set(stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    rows, cut = [], 0
    if instruction_rows:
        n = budget.max_new_tokens
        drafted = drafted_answers(tops, examples, prompt_ids, stops, n)
        todo = [i for i, d in enumerate(drafted) if d is None]  # rows where the model leaves the reference
        generated, cuts = (gguf_eval.generate_with_cuts(llm, tokenizer, [prompts[i] for i in todo], n) if llm is not None
                           else generate(model, tokenizer, [prompts[i] for i in todo], n, cfg.generate_batch_size))
        predictions = [tokenizer.decode(d, skip_special_tokens=True) if d is not None else "" for d in drafted]
        cut = sum(len(d) >= n for d in drafted if d is not None) + sum(cuts)  # a verified answer that filled the budget
        for i, text in zip(todo, generated):
            predictions[i] = text
        print(f"[evaluate] {len(prompts) - len(todo)} of {len(prompts)} greedy answers verified in the loss pass, "
              f"{len(todo)} generated; budget {n} new tokens ({'auto: ' if budget.auto else 'evaluate.max_new_tokens; '}"
              f"longest reference {budget.longest_reference_tokens} tokens); {cut} cut at the budget", flush=True)
        for conv, (_, ref), pred in zip(instruction_rows, pairs, predictions):
            user = next((m["content"] for m in reversed(conv) if m["role"] == "user"), "")
            rows.append({"prompt": user, "reference": ref, "prediction": pred.strip(), "correct": pred.strip() == ref.strip()})
    table = pd.DataFrame(rows, columns=["prompt", "reference", "prediction", "correct"])
    words = float(table["reference"].map(lambda r: len(str(r).split())).median()) if len(table) else 0.0
    kind = task_kind(table["reference"].tolist(), cfg.short_answer_words)
    scores = score(kind, table["prediction"].tolist(), table["reference"].tolist()) if len(table) else {}
    metrics = EvalMetrics(
        rows=len(frame),
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        exact_match=float(table["correct"].mean()) if len(table) else 0.0,
        exact_match_rows=len(table),
        task_metric=HEADLINE[kind] if len(table) else "loss",
        median_reference_words=words,
        task_kind=kind,
        scores={k: v.value for k, v in scores.items()},
        scores_low={k: v.low for k, v in scores.items()},
        scores_high={k: v.high for k, v in scores.items()},
        max_new_tokens=budget.max_new_tokens if instruction_rows else 0,
        longest_reference_tokens=budget.longest_reference_tokens,
        cut_predictions=cut,
    )
    return metrics, table

"""Greedy generation that stops where the model stops.

A chat model has more than one stop token: Llama-3 ends a turn with ``<|eot_id|>`` and a
text with ``<|end_of_text|>``, Qwen with ``<|im_end|>`` and ``<|endoftext|>``, Gemma with
``<end_of_turn>`` and ``<eos>``. ``generation_config.eos_token_id`` may hold that list;
passing ``eos_token_id=tokenizer.eos_token_id`` to ``generate`` overrides it with one id
and the model rambles past the end of its answer. Every generation in this project
(evaluation, quantized variants, the sample generations during training) uses
``stop_token_ids``: the model's list, the tokenizer's EOS and the template's end-of-turn.

How many tokens to generate is fitted to the answers (``generation_budget``): a fixed 32
scored a model that reproduces 400-token JSON answers at 0% valid JSON. A prediction that
reaches the budget without a stop token is *cut*; evaluation counts them and the summary
says so, so a too-small budget is never mistaken for a bad model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from llm_finetune.encoding import end_of_turn


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id generation stops at, the model's own list first, without duplicates."""
    ids: list = []
    configured = getattr(generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    ids.append(tokenizer.eos_token_id)
    eot = end_of_turn(tokenizer)
    ids.append(eot[1] if eot else None)
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


# auto budget: the longest reference plus this margin (16 tokens + 10%), so an answer a few tokens
# longer than its reference (a different but valid tokenisation, one more field) is not cut
MARGIN_TOKENS = 16
MARGIN_FRACTION = 0.1


@dataclass
class Budget:
    max_new_tokens: int  # what generation may produce
    longest_reference_tokens: int  # the longest reference answer of the rows, in tokens (0 = no references)
    auto: bool  # fitted (evaluate.max_new_tokens: auto) rather than set in the config
    context_cap: int = 0  # the model's context minus the longest prompt, when that lowered the budget (0 = did not)


def generation_budget(tokenizer, references: Sequence[str], configured: int, context: int = 0, longest_prompt: int = 0) -> Budget:
    """``configured`` when > 0; else the longest reference plus a margin, capped by what the context leaves after the prompt."""
    longest = max((len(tokenizer(str(r), add_special_tokens=False)["input_ids"]) for r in references), default=0)
    if configured > 0:
        return Budget(configured, longest, auto=False)
    want = longest + MARGIN_TOKENS + int(MARGIN_FRACTION * longest)
    room = context - longest_prompt if context else 0
    if context and room < want:
        return Budget(max(room, 1), longest, auto=True, context_cap=max(room, 1))
    return Budget(want, longest, auto=True)


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, synced_gpus: bool = False) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches), special tokens removed."""
    return greedy_with_cuts(model, tokenizer, prompts, max_new_tokens, batch_size, synced_gpus)[0]


@torch.no_grad()
def greedy_with_cuts(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                     synced_gpus: bool = False) -> tuple[list[str], list[bool]]:
    """``greedy``'s completions and, per prompt, whether it was cut: no stop token within ``max_new_tokens``.

    A batch generates until every row has stopped or the budget is spent, so a row whose new
    tokens hold no stop token ran the whole budget.
    """
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    cuts: list[bool] = []
    stop_set = set(stops)
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced_gpus,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
            cuts += [not stop_set.intersection(row) for row in new.tolist()]
    finally:
        tokenizer.padding_side = side
    return outputs, cuts

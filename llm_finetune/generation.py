"""Greedy generation that stops where the model stops.

A chat model has more than one stop token: Llama-3 ends a turn with ``<|eot_id|>`` and a
text with ``<|end_of_text|>``, Qwen with ``<|im_end|>`` and ``<|endoftext|>``, Gemma with
``<end_of_turn>`` and ``<eos>``. ``generation_config.eos_token_id`` may hold that list;
passing ``eos_token_id=tokenizer.eos_token_id`` to ``generate`` overrides it with one id
and the model rambles past the end of its answer. Every generation in this project
(evaluation, quantized variants, the sample generations during training) uses
``stop_token_ids``: the model's list, the tokenizer's EOS and the template's end-of-turn.
"""

from __future__ import annotations

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


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, synced_gpus: bool = False) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches), special tokens removed."""
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced_gpus,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
            )
            outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs

"""Greedy answers read off the loss pass, with the reference answer as a speculative draft.

Evaluation makes two passes over each test row: the loss pass (prompt + reference answer,
one forward) and greedy generation (the prompt, then one forward per new token). The loss
pass already holds the model's greedy choice at every answer position. Where the model's
top token after the prompt reproduces the reference token by token and then is a stop
token, greedy generation would produce exactly that answer: this is speculative decoding
with the reference as the draft, every draft token verified by the model. Those rows need
no generation; every other row is generated as before. A tuned model that answers most
rows right skips most of its generation; a base model that rambles skips none and pays
nothing extra, since the loss pass runs anyway.

One forward over prompt + answer and token-by-token decoding with a KV cache compute the
same logits up to floating-point rounding, so a near tie between two tokens could break
differently: the tests compare the answers with plain generation's.
"""

from __future__ import annotations

from typing import Sequence


def read_greedy(top: Sequence[int], ids: Sequence[int], prompt_len: int, stops: set[int], max_new_tokens: int) -> list[int] | None:
    """Greedy generation's new tokens after ``ids[:prompt_len]``, if this pass verifies all of them; else None.

    ``top[t]`` is the model's most likely token after ``ids[: t + 1]``. The answer ends at
    the first stop token (not included, as decoding skips it) or after ``max_new_tokens``
    tokens. None: the model leaves the draft before that, so its answer must be generated.
    """
    if prompt_len < 1:
        return None
    new: list[int] = []
    for t in range(prompt_len - 1, len(ids)):
        if len(new) == max_new_tokens:
            return new
        token = int(top[t])
        if token in stops:
            return new
        if t + 1 >= len(ids) or token != ids[t + 1]:
            return None
        new.append(token)
    return None


def prompt_len(ids: Sequence[int], prompt_ids: Sequence[int]) -> int:
    """``len(prompt_ids)`` when the scored row starts with exactly the generation prompt, else 0 (no draft)."""
    n = len(prompt_ids)
    return n if 0 < n < len(ids) and list(ids[:n]) == list(prompt_ids) else 0


def drafted_answers(tops: list[Sequence[int]], examples: list[dict], prompt_ids: list[Sequence[int]],
                    stops: set[int], max_new_tokens: int) -> list[list[int] | None]:
    """Per generation prompt: the verified greedy tokens, or None where the prompt must be generated.

    ``examples`` (the loss pass's rows) must map one to one onto the prompts; when they do
    not (long rows cut into blocks, packed rows, raw text rows), nothing is read off the pass.
    """
    packed = any(len(ex.get("seq_lens") or [0]) > 1 for ex in examples)
    if packed or len(examples) != len(prompt_ids) or len(tops) != len(examples):
        return [None] * len(prompt_ids)
    out: list[list[int] | None] = []
    for top, ex, p in zip(tops, examples, prompt_ids):
        n = prompt_len(ex["input_ids"], p)
        out.append(read_greedy(top, ex["input_ids"], n, stops, max_new_tokens) if n else None)
    return out

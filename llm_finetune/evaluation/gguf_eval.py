"""Score a GGUF variant in llama.cpp, the runtime its users run, instead of de-quantizing it.

transformers can load a GGUF only by de-quantizing every weight to float32 (32 GB for an 8B
model), and then measures the rounding, not llama.cpp's kernels. Here the file runs in
llama.cpp (``llm_finetune.export.gguf_runtime``); the token ids come from the same HF tokenizer the
other models are scored with (the tests check llama.cpp tokenizes identically), so the loss
counts the same answer tokens and the generations answer the same prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llm_finetune.encoding import IGNORE_INDEX


def _logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], dtype=np.float64)


def scoring_pass(llm, examples: list[dict]) -> tuple[float, list[list[int]]]:
    """Mean NLL per trained token (labels != IGNORE_INDEX), as ``evaluate.scoring_pass`` computes
    it, and llama.cpp's top token at every position (``draft_answers`` reads greedy answers off them)."""
    total, count, tops = 0.0, 0, []
    for ex in examples:
        ids, labels = list(ex["input_ids"]), list(ex["labels"])
        logits = _logits(llm, ids)
        tops.append(logits.argmax(-1).tolist())
        logits = logits[:-1]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for t, label in enumerate(labels[1:]):
            if label != IGNORE_INDEX:
                total -= logp[t, label]
                count += 1
    return total / max(count, 1), tops


def stop_ids(llm, tokenizer, generation_config=None) -> set[int]:
    """The tokens ``generate`` stops at: the model's whole stop list, as HF generation uses it
    (``generation.stop_token_ids``: generation_config's ids, EOS, the chat template's end of turn,
    e.g. Llama 3's ``<|eot_id|>`` beside ``<|end_of_text|>``), and the GGUF's own EOS and EOT."""
    from llm_finetune.evaluation.generation import stop_token_ids

    ids = set(stop_token_ids(tokenizer, generation_config)) | {llm.token_eos()}
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        value = (getattr(llm, "metadata", None) or {}).get(key)
        if value is not None:
            ids.add(int(value))
    return ids


def generate(llm, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions (stop at any of the model's stop tokens), decoded with the HF tokenizer."""
    return generate_with_cuts(llm, tokenizer, prompts, max_new_tokens)[0]


def generate_with_cuts(llm, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[str], list[bool]]:
    """``generate``'s completions and, per prompt, whether it ran out of ``max_new_tokens`` before a stop token."""
    stop = stop_ids(llm, tokenizer)
    out, cuts = [], []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        llm.reset()
        llm.eval(ids)
        new: list[int] = []
        cut = True
        for _ in range(max_new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token in stop:
                cut = False
                break
            new.append(token)
            llm.eval([token])
        out.append(tokenizer.decode(new, skip_special_tokens=True))
        cuts.append(cut)
    return out, cuts


def load(model_dir: str | Path, gguf_file: str, n_ctx: int):
    from llm_finetune.export.gguf_runtime import load_gguf

    return load_gguf(Path(model_dir) / gguf_file, n_ctx=n_ctx)

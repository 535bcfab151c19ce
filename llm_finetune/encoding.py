"""Render canonical examples into token ids and loss labels.

The tokenizer's chat template is used when it has one, so the tuned model is prompted
exactly as it will be served; otherwise a named prompt template (``alpaca``, ``plain``).
By default only completion tokens carry loss (prompt labels are -100), and every
trained turn ends exactly once with the template's end-of-turn token (``<|im_end|>``,
``<|eot_id|>``, ``<end_of_turn>``), so the model learns to stop where serving stops it.
What a template renders after that token (a newline before the next turn) is never
trained, and nothing follows the last turn: no extra EOS after the end-of-turn token.
Templates without a special end-of-turn token get the tokenizer's EOS appended.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llm_finetune.errors import DataError

IGNORE_INDEX = -100

PROMPT_TEMPLATES = {
    # Written for this project; "alpaca style" = instruction header, response header.
    "alpaca": {"system": "{content}\n\n", "user": "### Instruction:\n{content}\n\n", "assistant": "### Response:\n"},
    "plain": {"system": "{content}\n", "user": "{content}\n", "assistant": ""},
}


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int = 0  # tokens before the first completion token: what data.overlong: truncate_prompt may cut

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


_PROBE = "PROBEANSWER"


def _special_strings(tokenizer) -> list[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return list(dict.fromkeys([*tokenizer.all_special_tokens, *(t.content for t in added.values() if t.special)]))


def end_of_turn(tokenizer) -> tuple[str, int] | None:
    """The special token the chat template closes an assistant turn with, as (text, id).

    Found by rendering a probe answer and taking the first special token after it:
    ``<|im_end|>`` (ChatML / Qwen / SmolLM), ``<|eot_id|>`` (Llama-3), ``<end_of_turn>`` (Gemma).
    None without a chat template, or when the template closes turns with plain text.
    """
    if not has_chat_template(tokenizer):
        return None
    cached = getattr(tokenizer, "_llm_finetune_eot", False)
    if cached is not False:
        return cached
    conv = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": _PROBE}]
    full = tokenizer.apply_chat_template(conv, tokenize=False)
    suffix = full[full.rfind(_PROBE) + len(_PROBE) :]
    found = sorted((suffix.find(t), t) for t in _special_strings(tokenizer) if t and t in suffix)
    result = (found[0][1], tokenizer.convert_tokens_to_ids(found[0][1])) if found else None
    try:
        tokenizer._llm_finetune_eot = result
    except AttributeError:  # pragma: no cover - tokenizers that refuse new attributes
        pass
    return result


def _segments_chat_template(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_completion) pieces.

    Renders growing prefixes of the conversation and takes the differences; this needs
    a template whose rendering of a prefix is a prefix of the whole, true of common ones.
    A completion ends at the end-of-turn token: what follows it is prompt of the next turn,
    and after the last turn it is left out.
    """
    eot = end_of_turn(tokenizer)
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                "the tokenizer's chat template does not render conversations prefix by prefix, so completion "
                "tokens cannot be located; set data.train_on_prompt: true or use a model with a standard template"
            )
        segments.append((prompt[len(done) :], False))
        completion = full[len(prompt) :]
        cut = completion.rfind(eot[0]) + len(eot[0]) if eot and eot[0] in completion else len(completion)
        segments.append((completion[:cut], True))
        if i != last_assistant:
            segments.append((completion[cut:], False))
        done = full
    if messages[-1]["role"] != "assistant":  # trailing user/system turns: render them too
        rest = tokenizer.apply_chat_template(messages, tokenize=False)[len(done) :]
        if rest:
            segments.append((rest, False))
    return segments


def _segments_named_template(messages: list[dict], template: str, eos: str) -> list[tuple[str, bool]]:
    parts = PROMPT_TEMPLATES[template]
    segments: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            segments.append((parts["assistant"], False))
            segments.append((m["content"] + eos, True))
            if template == "alpaca" and i < len(messages) - 1:  # nothing follows the last completion
                segments.append(("\n\n", False))
        else:
            segments.append((parts[m["role"]].format(content=m["content"]), False))
    return segments


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _segments(tokenizer, messages: list[dict], template: str) -> list[tuple[str, bool]]:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("a conversation has no assistant message, so there is nothing to learn from it")
    if has_chat_template(tokenizer):
        return [(t, trained) for t, trained in _segments_chat_template(tokenizer, messages) if t]
    return [(t, trained) for t, trained in _segments_named_template(messages, template, tokenizer.eos_token or "") if t]


def _assemble(segments: list[tuple[str, bool]], pieces: list[list[int]], train_on_prompt: bool, close_id: int | None) -> Encoded:
    """Concatenate the pieces; ``close_id`` is appended to a completion that does not end with it."""
    ids: list[int] = []
    labels: list[int] = []
    prompt_tokens = None
    for (_, trained), piece in zip(segments, pieces):
        if trained:
            if close_id is not None and (not piece or piece[-1] != close_id):
                piece = piece + [close_id]
            prompt_tokens = len(ids) if prompt_tokens is None else prompt_tokens
        ids.extend(piece)
        labels.extend(piece if (trained or train_on_prompt) else [IGNORE_INDEX] * len(piece))
    return Encoded(ids, labels, prompt_tokens or 0)


def _close_id(tokenizer) -> int | None:
    """The token every completion must end with: the end-of-turn token, else EOS."""
    eot = end_of_turn(tokenizer)
    return eot[1] if eot else tokenizer.eos_token_id


def encode_messages(tokenizer, messages: list[dict], *, train_on_prompt: bool = False, template: str = "alpaca") -> Encoded:
    """Token ids and labels of a whole conversation; assistant turns are the completions."""
    return encode_many(tokenizer, [messages], train_on_prompt=train_on_prompt, template=template)[0]


def encode_many(tokenizer, conversations: list[list[dict]], *, train_on_prompt: bool = False, template: str = "alpaca") -> list[Encoded]:
    """``encode_messages`` for many conversations with one batched tokenizer call.

    The fast tokenizer encodes a batch in parallel in Rust; per-row calls were half of
    data preparation time (bench/NOTES.md). Segments are tokenized separately, so token
    boundaries between prompt and completion are the same as one by one.
    """
    all_segments = [_segments(tokenizer, conv, template) for conv in conversations]
    texts = [t for segs in all_segments for t, _ in segs]
    # a named template starts the conversation with the tokenizer's own special tokens (BOS)
    first_special = not has_chat_template(tokenizer)
    flat = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    if first_special:
        firsts = [segs[0][0] for segs in all_segments]
        with_bos = tokenizer(firsts, add_special_tokens=True)["input_ids"]
    close = _close_id(tokenizer)
    out, pos = [], 0
    for i, segs in enumerate(all_segments):
        pieces = flat[pos : pos + len(segs)]
        pos += len(segs)
        if first_special:
            pieces = [with_bos[i], *pieces[1:]]
        out.append(_assemble(segs, pieces, train_on_prompt, close))
    return out


def encode_text(tokenizer, text: str) -> Encoded:
    """Continued pre-training: every token is trained, the document ends with EOS."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return Encoded(ids, list(ids))


def encode_row(tokenizer, row: dict, *, train_on_prompt: bool = False, template: str = "alpaca") -> Encoded:
    """Encode one canonical row (``messages`` JSON or ``text``)."""
    if row.get("messages"):
        return encode_messages(tokenizer, json.loads(row["messages"]), train_on_prompt=train_on_prompt, template=template)
    return encode_text(tokenizer, row["text"])


def prompt_and_reference(tokenizer, messages: list[dict], template: str = "alpaca") -> tuple[str, str]:
    """The generation prompt for the last assistant turn, and that turn's reference text."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    context, reference = messages[:last], messages[last]["content"]
    if has_chat_template(tokenizer):
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    else:
        prompt = "".join(t for t, _ in _segments_named_template(context, template, tokenizer.eos_token or ""))
        prompt += PROMPT_TEMPLATES[template]["assistant"]
        if tokenizer.bos_token:
            prompt = tokenizer.bos_token + prompt
    return prompt, reference


def encode_frame(tokenizer, frame, data_cfg) -> list[dict]:
    """Training examples from get_data's token rows, or by encoding canonical rows.

    Token rows (``input_ids``, ``labels``, ``seq_lens``; packed or not) are used as they
    are. Canonical rows are encoded here; text is cut into ``data.max_length`` blocks. Shared
    by SFT training and evaluation's loss pass, which must see the same tokens.
    """
    if "input_ids" in frame.columns:
        return [
            {"input_ids": list(r["input_ids"]), "labels": list(r["labels"]), "seq_lens": [int(x) for x in r["seq_lens"]]}
            for r in frame.to_dict(orient="records")
        ]
    out = []
    for row in frame.to_dict(orient="records"):
        enc = encode_row(tokenizer, row, train_on_prompt=data_cfg.train_on_prompt, template=data_cfg.prompt_template)
        n = data_cfg.max_length or max(len(enc.input_ids), 1)  # 0 = auto: get_data fitted the rows already
        for start in range(0, len(enc.input_ids), n):
            ids, labels = enc.input_ids[start : start + n], enc.labels[start : start + n]
            if any(x != IGNORE_INDEX for x in labels):
                out.append({"input_ids": ids, "labels": labels})
    return out

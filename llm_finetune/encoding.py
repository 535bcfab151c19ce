"""Render canonical examples into token ids and loss labels.

The tokenizer's chat template is used when it has one, so the tuned model is prompted
exactly as it will be served; otherwise a named prompt template (``alpaca``, ``plain``).
By default only completion tokens carry loss (prompt labels are -100), and every
trained turn ends with the end-of-turn/EOS token so the model learns to stop.
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

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _segments_chat_template(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_completion) pieces.

    Renders growing prefixes of the conversation and takes the differences; this needs
    a template whose rendering of a prefix is a prefix of the whole, true of common ones.
    """
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
        segments.append((full[len(prompt) :], True))
        done = full
    if messages[-1]["role"] != "assistant":  # trailing user/system turns: render them too
        rest = tokenizer.apply_chat_template(messages, tokenize=False)[len(done) :]
        if rest:
            segments.append((rest, False))
    return segments


def _segments_named_template(messages: list[dict], template: str, eos: str) -> list[tuple[str, bool]]:
    parts = PROMPT_TEMPLATES[template]
    segments: list[tuple[str, bool]] = []
    for m in messages:
        if m["role"] == "assistant":
            segments.append((parts["assistant"], False))
            segments.append((m["content"] + eos, True))
            if template == "alpaca":
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


def _assemble(tokenizer, segments: list[tuple[str, bool]], pieces: list[list[int]], train_on_prompt: bool) -> Encoded:
    ids: list[int] = []
    labels: list[int] = []
    eos_id = tokenizer.eos_token_id
    for (_, trained), piece in zip(segments, pieces):
        if trained and eos_id is not None and eos_id not in piece:
            piece = piece + [eos_id]
        ids.extend(piece)
        labels.extend(piece if (trained or train_on_prompt) else [IGNORE_INDEX] * len(piece))
    return Encoded(ids, labels)


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
    out, pos = [], 0
    for i, segs in enumerate(all_segments):
        pieces = flat[pos : pos + len(segs)]
        pos += len(segs)
        if first_special:
            pieces = [with_bos[i], *pieces[1:]]
        out.append(_assemble(tokenizer, segs, pieces, train_on_prompt))
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

"""Tiny offline tokenizers in the styles of Llama-3, Qwen2.5 and Gemma chat templates.

Byte-level BPE without merges (every byte is a token, so any text encodes) plus each
family's special tokens, saved as a local HF tokenizer directory: no hub. The templates
are written here after the public ones, reduced to what matters for turn boundaries:
where a turn starts, the end-of-turn token, and what is rendered after it. The EOS each
tokenizer declares differs from its end-of-turn token on purpose where the real base
tokenizers do so (Llama-3 base: <|end_of_text|>; Qwen2.5 base: <|endoftext|>; Gemma: <eos>).
"""

from __future__ import annotations

from pathlib import Path

STYLES = {
    "llama3": {
        # id 0 is <|end_of_text|>: the stop token only generation_config lists (see test_stop_tokens)
        "specials": ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "eot": "<|eot_id|>",
        "template": (
            "{{- bos_token }}{%- for message in messages %}"
            "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
            "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
        ),
    },
    "qwen2.5": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None, "eos": "<|endoftext|>", "eot": "<|im_end|>",
        "template": (
            "{%- for message in messages %}"
            "{%- if loop.first and message['role'] != 'system' %}"
            "{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
            "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
            "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
        ),
    },
    "gemma": {
        "specials": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>", "eos": "<eos>", "eot": "<end_of_turn>",
        "template": (
            "{{ bos_token }}{%- for message in messages %}"
            "{%- if message['role'] == 'assistant' %}{%- set role = 'model' %}{%- else %}{%- set role = message['role'] %}{%- endif %}"
            "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
            "{%- endfor %}{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
        ),
    },
}


def build_chat_tokenizer(style: str, out: Path):
    """Write the tokenizer of ``style`` to ``out`` and load it back with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = STYLES[style]
    vocab = {t: i for i, t in enumerate(spec["specials"])}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"], pad_token=spec["eos"],
        additional_special_tokens=[t for t in spec["specials"] if t not in (spec["bos"], spec["eos"])],
    )
    fast.chat_template = spec["template"]
    out = Path(out)
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)

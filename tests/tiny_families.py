"""Tiny random models of the families users tune, built offline: config, weights and tokenizer files.

Each tokenizer is trained here on a small text sample with the same pre-tokenizer, special
tokens, BOS rule and chat-template shape as the published one (Llama 3.x: llama-bpe regex,
<|begin_of_text|> added; Qwen2.5: qwen2 regex, NFC, no BOS, ChatML; Mistral: SentencePiece
BPE with byte fallback and [INST]; SmolLM2: the embedded model's real tokenizer). Nothing
comes from the hub.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Rewrite 5 March 2021 in ISO 8601: 2021-03-05. The year 1999 had 365 days; 2024 had 366.",
    "I've been told he's there, you're sure? We'll see. They'd like some tea, wouldn't they?",
    "def add(a, b):\n    return a + b\n\nprint(add(3, 33))  # 36\n",
    "Le café coûte 3,50 € — très cher! Ünïcödé naïve façade, 東京 2020, 🚀 emojis too.",
    "   leading spaces,\ttabs\tand\n\nblank lines\n",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! numbers 0123456789.",
] * 20

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def _byte_level_bpe(split_regex: str, specials: list[str], vocab_size: int, nfc: bool, ignore_merges: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(specials)  # ids after the base vocabulary, as in the published tokenizers
    return tok


def llama3_tokenizer(out: Path):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from llm_finetune.gguf_export import _LLAMA3_REGEX

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _byte_level_bpe(_LLAMA3_REGEX, specials, 700, nfc=False, ignore_merges=True)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                 pad_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE)
    hf.save_pretrained(out)
    return hf


def qwen2_tokenizer(out: Path):
    from transformers import PreTrainedTokenizerFast

    from llm_finetune.gguf_export import _QWEN2_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _byte_level_bpe(_QWEN2_REGEX, specials, 700, nfc=True, ignore_merges=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 chat_template=CHATML_TEMPLATE)
    hf.save_pretrained(out)
    return hf


def mistral_tokenizer(out: Path):
    """A SentencePiece BPE model (byte fallback, digits split, dummy prefix) saved as tokenizer.model + tokenizer.json."""
    import io
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, model_type="bpe", vocab_size=600, byte_fallback=True,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, add_dummy_prefix=True,
        character_coverage=1.0, minloglevel=2,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "chat_template": MISTRAL_TEMPLATE,
    }))
    hf = AutoTokenizer.from_pretrained(out)
    hf.save_pretrained(out)
    return hf


def smollm2_tokenizer(out: Path, smollm_tokenizer):
    smollm_tokenizer.save_pretrained(out)
    return smollm_tokenizer


def save_family(family: str, out: Path, smollm_tokenizer=None, seed: int = 0, **overrides) -> Path:
    """Write a 2-layer random model of ``family`` (llama3, qwen2, mistral, smollm2) with its tokenizer to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    out = Path(out)
    tok = {"llama3": llama3_tokenizer, "qwen2": qwen2_tokenizer, "mistral": mistral_tokenizer}.get(family)
    tok = tok(out) if tok else smollm2_tokenizer(out, smollm_tokenizer)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    if family == "llama3":  # Llama 3.2 style: llama3 rope scaling, untied, head_dim != hidden / heads
        cfg = LlamaConfig(**common, tie_word_embeddings=False, head_dim=32, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif family == "qwen2":  # Qwen2.5-0.5B style: q/k/v biases, tied embeddings
        cfg = Qwen2Config(**common, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    elif family == "mistral":
        cfg = MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    else:
        cfg = LlamaConfig(**common, tie_word_embeddings=True)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if family == "qwen2":  # random biases, so a dropped or misnamed bias shows in the logits
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out

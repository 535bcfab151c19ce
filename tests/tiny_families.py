"""Tiny random models of the families users tune, with their real tokenizers, built offline.

The tokenizers are the published ones, from the reference vocabularies llama.cpp ships with its
tokenizer tests (``models/ggml-vocab-*.gguf``, fetched by images/fetch_llama_cpp.sh with the
converter): Llama 3's llama-bpe (128k), Qwen2's (152k; Qwen2.5 and Qwen3 use it), Phi-3's and
Llama 2's SentencePiece vocabularies, rebuilt as tokenizer.json / tokenizer.model. Each comes
with its family's real chat template from llama.cpp's ``models/templates``. Each vocabulary also
has llama.cpp's own tokenization cases (``.inp`` / ``.out``): an independent reference for what
a GGUF export must tokenize to. SmolLM2 uses the embedded model's tokenizer. Nothing comes from
the hub. Mistral v0.1 and Gemma ship SentencePiece vocabularies llama.cpp does not carry, so
Llama 2's stands in for them (same format: BPE pieces, byte fallback, dummy prefix).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

# family -> (llama.cpp reference vocabulary, chat template file under models/templates or a template, special tokens)
FAMILIES = {
    "llama3": ("llama-bpe", "meta-llama-Llama-3.1-8B-Instruct.jinja", {"eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}),
    "qwen2": ("qwen2", "Qwen-Qwen2.5-7B-Instruct.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}),
    "qwen3": ("qwen2", "Qwen-Qwen3-0.6B.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}),
    "phi3": ("phi-3", "microsoft-Phi-3.5-mini-instruct.jinja", {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
    "mistral": ("llama-spm", MISTRAL_TEMPLATE, {}),
    "gemma2": ("llama-spm", "google-gemma-2-2b-it.jinja", {}),
    "gemma3": ("llama-spm", "google-gemma-2-2b-it.jinja", {}),  # Gemma-3's chat format is Gemma-2's
    "smollm2": (None, None, {}),
}
SPM_VOCABS = {"llama-spm", "phi-3"}
_BUILT: dict[str, Path] = {}  # vocabulary + template -> a saved tokenizer folder, per test session


def llama_cpp_models() -> Path:
    from llm_finetune.export.gguf_convert import converter_dir

    return converter_dir() / "models"


def vocab_cases(vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenization cases for ``vocab``: (text, token ids without BOS)."""
    models = llama_cpp_models()
    texts = (models / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (models / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in i.split()]) for t, i in zip(texts, ids) if t]


def _spm_model(vocab: str, out: Path, dummy_prefix: bool = True) -> list[str]:
    """Write tokenizer.model from the GGUF vocabulary (pieces, scores and types as in the original model);
    returns the tokens after its pieces (Phi-3's chat tokens, which become added tokens)."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as pb

    r = GGUFReader(llama_cpp_models() / f"ggml-vocab-{vocab}.gguf")
    tokens, scores, types = (r.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type"))
    n = 32000  # the SentencePiece model of both (Llama 2, Phi-3); Phi-3 adds 64 chat tokens after it
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = n
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.trainer_spec.split_digits = True
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = dummy_prefix
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for i in range(n):
        piece = m.pieces.add()
        piece.piece, piece.score = tokens[i], float(scores[i])
        # <unk> unknown, <s> </s> control as in Llama 2's tokenizer.model; after them GGUF and SentencePiece
        # number the types alike (1 normal, 6 byte)
        piece.type = 2 if i == 0 else 3 if i < 3 else int(types[i])
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(m.SerializeToString())
    return list(tokens[n:])


def real_tokenizer(family: str, out: Path, smollm_tokenizer=None):
    """Save ``family``'s real tokenizer with its chat template to ``out``; returns it loaded."""
    from transformers import AutoTokenizer

    vocab, template, specials = FAMILIES[family]
    if vocab is None:
        smollm_tokenizer.save_pretrained(out)
        return smollm_tokenizer
    key = f"{vocab}:{template}"
    if key not in _BUILT:
        built = Path(tempfile.mkdtemp(prefix=f"tok-{family}-"))
        chat = template if "{" in template else (llama_cpp_models() / "templates" / template).read_text()
        if vocab in SPM_VOCABS:
            extra = _spm_model(vocab, built, dummy_prefix=not family.startswith("gemma"))  # Gemma's has none
            (built / "tokenizer_config.json").write_text(json.dumps({
                **({"add_prefix_space": False} if family.startswith("gemma") else {}), "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": True, "add_eos_token": False, "legacy": False}))
            tok = AutoTokenizer.from_pretrained(built)
            if extra:  # Phi-3's chat tokens, ids 32000.. in order; as in its tokenizer.json all but <|endoftext|>
                from tokenizers import AddedToken  # strip the whitespace after them (rstrip), as llama.cpp does

                tok.add_tokens([AddedToken(t, rstrip=t != "<|endoftext|>", special=True, normalized=False) for t in extra],
                               special_tokens=True)
        else:
            tok = AutoTokenizer.from_pretrained(llama_cpp_models(), gguf_file=f"ggml-vocab-{vocab}.gguf")
        for k, v in specials.items():
            setattr(tok, k, v)
        tok.chat_template = chat
        tok.save_pretrained(built)
        if vocab == "llama-bpe":  # what transformers' GGUF reader leaves out of Llama 3's tokenizer.json (llama.cpp's
            # converter tells the two apart by their tokens and would take it for Smaug's): a word in the vocabulary
            tj = json.loads((built / "tokenizer.json").read_text())  # is taken whole (ignore_merges)
            tj["model"]["ignore_merges"] = True
            bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}  # and adds <|begin_of_text|>
            tj["post_processor"] = {
                "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [tok.bos_token_id],
                                                         "tokens": ["<|begin_of_text|>"]}}}
            (built / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
        _BUILT[key] = built
    shutil.copytree(_BUILT[key], out, dirs_exist_ok=True)
    return AutoTokenizer.from_pretrained(out)


def save_family(family: str, out: Path, smollm_tokenizer=None, seed: int = 0, **overrides) -> Path:
    """Write a 2-layer random model of ``family`` (see FAMILIES) with its real tokenizer to ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    tok = real_tokenizer(family, out, smollm_tokenizer)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    shape = {  # the published configs' distinguishing features
        # Llama 3.2: llama3 rope scaling, untied, head_dim != hidden / heads
        "llama3": ("llama", dict(tie_word_embeddings=False, head_dim=32, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
        # Qwen2.5-0.5B: q/k/v biases, tied embeddings
        "qwen2": ("qwen2", dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        # Qwen3: q/k RMSNorm per head, no biases, head_dim 128 against hidden 1024 in 0.6B
        "qwen3": ("qwen3", dict(tie_word_embeddings=True, head_dim=32)),
        # Phi-3: fused qkv_proj and gate_up_proj
        "phi3": ("phi3", dict(tie_word_embeddings=False)),
        "mistral": ("mistral", dict(tie_word_embeddings=False, sliding_window=None)),
        # Gemma-2: tied, scaled embeddings, four norms a layer, logit soft-capping, query_pre_attn_scalar
        "gemma2": ("gemma2", dict(tie_word_embeddings=True, head_dim=16, query_pre_attn_scalar=16, sliding_window=512)),
        # Gemma-3: Gemma-2's layout plus q/k norms, local layers with their own rope base, no soft-capping
        "gemma3": ("gemma3_text", dict(tie_word_embeddings=True, head_dim=16, query_pre_attn_scalar=16, sliding_window=512)),
        "smollm2": ("llama", dict(tie_word_embeddings=True)),
    }
    model_type, extra = shape[family]
    cfg = AutoConfig.for_model(model_type, **common, **extra)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random biases and norms, so a dropped, misnamed or offset (Gemma's 1 + w) one shows
        for name, p in model.named_parameters():
            if name.endswith("proj.bias") or (family in ("qwen3", "gemma2", "gemma3") and "norm" in name):
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out

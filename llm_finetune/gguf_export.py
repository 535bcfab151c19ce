"""Export a merged Hugging Face model as one GGUF file for llama.cpp / Ollama.

Built from the ``gguf`` package's own pieces (the Python half of llama.cpp): tensor names
from ``gguf.get_tensor_name_map``, special tokens / ``add_bos`` / chat template / merges from
``gguf.SpecialVocab``, the SentencePiece vocabulary from the same code path as llama.cpp's
converter, and ``gguf.quants`` for q8_0. What stays ours mirrors llama.cpp's
``convert_hf_to_gguf.py`` (the ``conversion/`` package of the llama.cpp that
llama-cpp-python 0.3.36 vendors) for the families below:

- the rotary Q/K row permutation of the ``llama`` architecture (Llama, Mistral, SmolLM);
  ``qwen2`` keeps HF's layout and has q/k/v biases;
- ``head_dim`` from the config (``key_length`` / ``value_length`` / rope dimension);
- Llama-3.1 ``llama3`` rope scaling as the ``rope_freqs.weight`` factors llama.cpp reads,
  ``linear`` rope scaling as scaling type + factor;
- the BPE pre-tokenizer name. llama.cpp's converter identifies it by hashing the token ids
  of a test string, which only recognises unchanged published tokenizers; here it is read
  from the tokenizer's own pre-tokenizer definition (the regex llama.cpp implements under
  that name), so a re-trained or extended vocabulary is still written correctly.

We do not run ``convert_hf_to_gguf.py`` itself: no wheel ships it (only the llama-cpp-python
sdist and the llama.cpp repo), it needs the ``gguf-py`` of its own commit (different files
from PyPI's gguf 0.19.0 under the same version number) and it refuses any BPE tokenizer
whose hash is not in its table. Tensors are streamed one at a time (a model never sits in
memory twice). ``tests/test_gguf_llamacpp.py`` checks every family in llama.cpp itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm_finetune.errors import FineTuneError

GGUF_TYPES = ("q8_0", "f16", "f32")
# HF model_type -> (llama.cpp architecture name, Q/K rows permuted for llama.cpp's rope)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
ROPE_TYPES = ("default", "llama3", "linear")

# BPE pre-tokenizer regexes (tokenizer.json "Split" patterns) and the llama.cpp pre-tokenizer
# implementing each (llama.cpp src/llama-vocab.cpp)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_PRE_TOKENIZERS = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


class GGUFExportError(FineTuneError):
    """The model cannot be written as GGUF by this exporter (unsupported architecture or tokenizer)."""


def _unsupported(what: str) -> GGUFExportError:
    return GGUFExportError(
        f"GGUF export: {what}. This exporter supports model_type {', '.join(SUPPORTED_MODEL_TYPES)} "
        f"(Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5) with rope scaling {', '.join(ROPE_TYPES)}, and a byte-level BPE "
        "tokenizer.json (Llama 3, Qwen2, SmolLM, GPT-2 pre-tokenizers) or a SentencePiece tokenizer.model. "
        "Remove gguf_* from quantize.variants for this model, or convert it with llama.cpp's convert_hf_to_gguf.py."
    )


def rope_parameters(config: dict) -> dict:
    """rope type, theta and scaling factors, from transformers 5 ``rope_parameters`` or the older ``rope_scaling``."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params:
        params = params.get("full_attention", params)
    else:
        params = dict(config.get("rope_scaling") or {})
    out = dict(params)
    out["rope_type"] = out.get("rope_type", out.get("type")) or "default"
    out["rope_theta"] = float(out.get("rope_theta", config.get("rope_theta", 10000.0)))
    return out


@dataclass
class Tokenizer:
    kind: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # llama.cpp pre-tokenizer name ("default" for SentencePiece)


def _bpe_pre_tokenizer(pre: dict | None) -> str | None:
    """The llama.cpp pre-tokenizer whose regex is the one in tokenizer.json, or None."""
    if not pre:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    splits = [s for s in steps if s.get("type") == "Split"]
    if kinds in (["Split", "ByteLevel"], ["Split"]) and len(splits) == 1:
        pattern = splits[0].get("pattern", {}).get("Regex")
        return SPLIT_PRE_TOKENIZERS.get(pattern)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    return None


def detect_tokenizer(model_dir: Path) -> Tokenizer:
    tok_file, spm_file = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    data = json.loads(tok_file.read_text()) if tok_file.is_file() else {}
    model = data.get("model", {})
    if spm_file.is_file() and (not data or model.get("byte_fallback") or model.get("type") == "Unigram"):
        return Tokenizer("llama", "default")
    if not data:
        raise _unsupported(f"{model_dir} has neither tokenizer.json nor tokenizer.model")
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise _unsupported(
            f"{model_dir}/tokenizer.json is a {model.get('type')} tokenizer with byte_fallback={model.get('byte_fallback')} "
            "(SentencePiece style) but tokenizer.model is missing; save the model with its tokenizer.model"
        )
    pre = _bpe_pre_tokenizer(data.get("pre_tokenizer"))
    if pre is None:
        raise _unsupported(
            f"the BPE pre-tokenizer in {model_dir}/tokenizer.json is not one llama.cpp implements under a known name: "
            f"{json.dumps(data.get('pre_tokenizer'))[:300]}"
        )
    return Tokenizer("gpt2", pre)


def check_exportable(model_dir: str | Path) -> dict:
    """The model's config.json if this exporter can handle it (reads only config and tokenizer files)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise _unsupported(f"model_type {model_type!r} ({', '.join(config.get('architectures') or [])}) is not supported")
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise _unsupported(f"rope scaling {rope_type!r} is not supported")
    detect_tokenizer(model_dir)
    return config


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for Q/K rows (the inverse of what transformers undoes on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(params: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 rope scaling, as llama.cpp's converter writes them (rope_freqs.weight)."""
    base = params["rope_theta"]
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _vocab(model_dir: Path, tok: Tokenizer, vocab_size: int) -> tuple[list[bytes], list[float] | None, list[int]]:
    """Token strings, SentencePiece scores (None for BPE) and types, padded to the model's vocab_size."""
    from gguf import TokenType

    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    if tok.kind == "llama":
        from gguf import SentencePieceVocab

        scores = [-10000.0] * vocab_size
        for i, (text, score, ttype) in enumerate(SentencePieceVocab(model_dir).all_tokens()):
            if i < vocab_size:
                tokens[i], scores[i], types[i] = text, score, int(ttype)
        added = json.loads((model_dir / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {}) \
            if (model_dir / "tokenizer_config.json").is_file() else {}
        for i, t in ((int(k), v) for k, v in added.items()):
            if i < vocab_size:
                tokens[i], scores[i] = t["content"].encode(), -1000.0
                types[i] = int(TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
        return tokens, scores, types
    data = json.loads((model_dir / "tokenizer.json").read_text())
    for s, i in data["model"]["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = s.encode(), int(TokenType.NORMAL)
    for t in data.get("added_tokens", []):
        if t["id"] < vocab_size:
            tokens[t["id"]] = t["content"].encode()
            types[t["id"]] = int(TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
    return tokens, None, types


def _add_space_prefix(model_dir: Path) -> bool:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def _tokenizer_metadata(writer, model_dir: Path, vocab_size: int) -> None:
    import gguf

    tok = detect_tokenizer(model_dir)
    tokens, scores, types = _vocab(model_dir, tok, vocab_size)
    writer.add_tokenizer_model(tok.kind)
    writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_add_space_prefix(model_dir))
    writer.add_token_types(types)
    # merges, bos/eos/unk/pad ids, add_bos/add_eos (tokenizer_config or the post-processor), chat template
    gguf.SpecialVocab(model_dir, load_merges=tok.kind == "gpt2", n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _read_weights(model_dir: Path) -> dict[str, tuple[Path, str]]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"GGUF export: {model_dir} has no *.safetensors weights; save the merged model with save_pretrained")
    where: dict[str, tuple[Path, str]] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                where[k] = (f, k)
    return where


def _shape(where: tuple[Path, str]) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(where[0], framework="pt") as st:
        return tuple(st.get_slice(where[1]).get_shape())


def _load(where: tuple[Path, str]) -> np.ndarray:
    import torch
    from safetensors import safe_open

    with safe_open(where[0], framework="pt") as st:
        return st.get_tensor(where[1]).to(torch.float32).numpy()


def export_gguf(model_dir: str | Path, out_file: str | Path, gguf_type: str = "q8_0", name: str = "") -> Path:
    """Write ``model_dir`` (merged HF model + tokenizer) as ``out_file`` in ``gguf_type``.

    q8_0 quantizes every 2-D weight whose rows split into 32-value blocks (as llama.cpp
    does, embeddings and output included); norms, biases and rope factors stay float32.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF export: type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    config = check_exportable(model_dir)
    arch_name, permute = ARCHITECTURES[config["model_type"]]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    vocab_size = int(config["vocab_size"])
    rope = rope_parameters(config)

    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32}[gguf_type]
    file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}[gguf_type]

    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_file), arch_name)
    writer.add_type("model")
    writer.add_name(name or model_dir.name)
    writer.add_block_count(n_layers)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(writer, model_dir, vocab_size)

    # plan: (gguf name, loader) in file order; tensor infos first, data streamed after the header
    names = gguf.get_tensor_name_map(arch, n_layers)
    weights = _read_weights(model_dir)
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in weights
    plan: list[tuple[str, tuple[int, ...], object]] = []
    for key in weights:
        if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and tied):
            continue
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise _unsupported(f"tensor {key} has no GGUF name for architecture {arch_name}")
        n_rows = n_head if key.endswith(("q_proj.weight", "q_proj.bias")) else n_kv if key.endswith(("k_proj.weight", "k_proj.bias")) else 0
        load = (lambda key=key, n=n_rows: _permute(_load(weights[key]), n)) if permute and n_rows else (lambda key=key: _load(weights[key]))
        plan.append((gname, _shape(weights[key]), load))
    if rope["rope_type"] == "llama3":
        plan.append(("rope_freqs.weight", (head_dim // 2,), lambda: llama3_rope_factors(rope, head_dim)))
    plan.sort(key=lambda p: (p[0] != "token_embd.weight", p[0].startswith("output"), p[0]))

    def stored_type(gname: str, shape: tuple[int, ...]):
        if len(shape) == 1 or qtype == gguf.GGMLQuantizationType.F32 or gname == "rope_freqs.weight":
            return gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32 == 0:
            return qtype
        return gguf.GGMLQuantizationType.F16  # f16, or rows that do not split into q8_0 blocks (as in llama.cpp)

    def encode(gname: str, data: np.ndarray) -> np.ndarray:
        kind = stored_type(gname, data.shape)
        if kind == gguf.GGMLQuantizationType.Q8_0:
            return gguf.quants.quantize(data, kind)
        return data.astype(np.float16 if kind == gguf.GGMLQuantizationType.F16 else np.float32)

    for gname, shape in ((g, s) for g, s, _ in plan):
        kind = stored_type(gname, shape)
        nbytes = gguf.quants.quant_shape_to_byte_shape(shape, kind) if kind == gguf.GGMLQuantizationType.Q8_0 else shape
        dtype = {gguf.GGMLQuantizationType.Q8_0: np.uint8, gguf.GGMLQuantizationType.F16: np.float16}.get(kind, np.float32)
        writer.add_tensor_info(gname, nbytes, np.dtype(dtype), int(np.prod(nbytes)) * np.dtype(dtype).itemsize,
                               raw_dtype=kind if kind == gguf.GGMLQuantizationType.Q8_0 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for gname, shape, load in plan:
        writer.write_tensor_data(encode(gname, load()))
    writer.close()
    return out_file

"""Export a merged Hugging Face Llama-architecture model as one GGUF file for llama.cpp / Ollama.

Written with the ``gguf`` package (``GGUFWriter`` + ``gguf.quants``) instead of shelling out
to llama.cpp's ``convert_hf_to_gguf.py``, which is not pip-installable and would pull a C++
build into the image. It follows that script's conventions for the Llama architecture:
tensor names (``blk.N.attn_q.weight`` ...), the rotary Q/K row permutation llama.cpp
expects, metadata keys, and GPT-2 style BPE tokenizer metadata (tokens, types, merges,
special ids, chat template). The embedded SmolLM2 GGUF, written by llama.cpp, has exactly
these keys; ``transformers`` reads the exported file back (the tests compare logits).

Supported: ``LlamaForCausalLM`` (model_type ``llama``: Llama 2/3 with a byte-level BPE
tokenizer, SmolLM, TinyLlama-style BPE models) without rope scaling. Other architectures
raise ``GGUFExportError`` saying so, before any work is done.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llm_finetune.errors import FineTuneError

SUPPORTED_MODEL_TYPES = ("llama",)
GGUF_TYPES = ("q8_0", "f16", "f32")

# llama.cpp picks its pre-tokenizer regex by this name; unknown models get the GPT-2 default.
_PRE_TOKENIZERS = {"smollm": "smollm", "llama-3": "llama-bpe", "llama3": "llama-bpe", "meta-llama-3": "llama-bpe"}

_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


class GGUFExportError(FineTuneError):
    """The model cannot be written as GGUF by this exporter (unsupported architecture or tokenizer)."""


def _unsupported(what: str) -> GGUFExportError:
    return GGUFExportError(
        f"GGUF export: {what}. This exporter supports Llama-architecture models (model_type 'llama', "
        "LlamaForCausalLM) with a byte-level BPE tokenizer.json and no rope scaling, e.g. SmolLM2, Llama 3 8B. "
        "Remove gguf_* from quantize.variants for this model, or convert it with llama.cpp's convert_hf_to_gguf.py."
    )


def check_exportable(model_dir: str | Path) -> dict:
    """The model's config.json if this exporter can handle it; otherwise a GGUFExportError."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(f"model_type {model_type!r} ({', '.join(config.get('architectures') or [])}) is not supported")
    rope = config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    params = config.get("rope_parameters") or {}
    rope_type = params.get("rope_type", rope_type) if isinstance(params, dict) else rope_type
    if rope_type not in (None, "default"):
        raise _unsupported(f"rope scaling {rope_type!r} is not supported")
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise _unsupported(f"{model_dir} has no tokenizer.json")
    tok_model = json.loads(tok_file.read_text()).get("model", {})
    if tok_model.get("type") != "BPE" or tok_model.get("byte_fallback"):
        raise _unsupported("the tokenizer is not a byte-level (GPT-2 style) BPE; SentencePiece-style tokenizers are not supported")
    return config


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for Q/K rows (the inverse of what transformers undoes on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


def _tokenizer_metadata(writer, model_dir: Path, vocab_size: int) -> None:
    from gguf import TokenType
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = json.loads((model_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        s = by_id[i]
        tokens.append(s)
        if s in added:
            types.append(TokenType.CONTROL if added[s].get("special") else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    name = str(json.loads((model_dir / "config.json").read_text()).get("_name_or_path", "")).lower()
    pre = next((v for k, v in _PRE_TOKENIZERS.items() if k in name or k in str(model_dir).lower()), None)
    if pre is None and "smollm" in (tok.chat_template or "").lower():
        pre = "smollm"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or ("smollm" if tok.vocab_size == 49152 else "default"))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for add, token_id in (
        (writer.add_bos_token_id, tok.bos_token_id),
        (writer.add_eos_token_id, tok.eos_token_id),
        (writer.add_unk_token_id, tok.unk_token_id),
        (writer.add_pad_token_id, tok.pad_token_id),
    ):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(False)  # chat templates in these models add their own markers
    writer.add_add_space_prefix(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def export_gguf(model_dir: str | Path, out_file: str | Path, gguf_type: str = "q8_0", name: str = "") -> Path:
    """Write ``model_dir`` (merged HF Llama model + tokenizer) as ``out_file`` in ``gguf_type``.

    q8_0 quantizes every 2-D weight whose rows split into 32-value blocks (as llama.cpp
    does); norms stay float32.
    """
    import gguf
    import torch
    from safetensors import safe_open

    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF export: type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    config = check_exportable(model_dir)
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    vocab_size = int(config["vocab_size"])

    weights: dict[str, torch.Tensor] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"GGUF export: {model_dir} has no *.safetensors weights; save the merged model with save_pretrained")
    for f in files:
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                weights[k] = st.get_tensor(k)

    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32}[gguf_type]
    file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}[gguf_type]

    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_type("model")
    writer.add_name(name or model_dir.name)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(writer, model_dir, vocab_size)

    def put(name: str, t: torch.Tensor) -> None:
        data = t.detach().to(torch.float32).numpy()
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        elif data.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(data, qtype)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:  # rows that do not split into Q8_0 blocks stay f16, as in llama.cpp
            writer.add_tensor(name, data.astype(np.float16))

    put("token_embd.weight", weights.pop("model.embed_tokens.weight"))
    for i in range(int(config["num_hidden_layers"])):
        for hf, gg in _LAYER_TENSORS.items():
            key = f"model.layers.{i}.{hf}"
            if key not in weights:
                raise _unsupported(f"tensor {key} is missing (not a plain Llama layout)")
            t = weights.pop(key)
            if hf == "self_attn.q_proj.weight":
                t = torch.from_numpy(_permute(t.float().numpy(), n_head))
            elif hf == "self_attn.k_proj.weight":
                t = torch.from_numpy(_permute(t.float().numpy(), n_kv))
            put(f"blk.{i}.{gg}", t)
    put("output_norm.weight", weights.pop("model.norm.weight"))
    lm_head = weights.pop("lm_head.weight", None)
    if lm_head is not None and not config.get("tie_word_embeddings", False):
        put("output.weight", lm_head)
    leftover = [k for k in weights if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise _unsupported(f"tensors without a GGUF mapping: {', '.join(leftover[:5])}")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file

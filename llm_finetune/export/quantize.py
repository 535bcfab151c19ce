"""Quantized copies of the merged model: bitsandbytes int8 / nf4 and GGUF (q8_0, f16, q4_k_m, q5_k_m).

bitsandbytes >= 0.45 runs its kernels on CPU too, so the default pipeline quantizes on a
laptop; on a GPU the same code uses the CUDA kernels. The bnb variants are saved with
``save_pretrained`` (their config carries ``quantization_config``), so a plain
``AutoModelForCausalLM.from_pretrained(dir)`` loads them. GGUF variants are one file for
llama.cpp and Ollama, written by llama.cpp's own converter (``llm_finetune.export.gguf_convert``); Q4_K_M
and Q5_K_M, the files Ollama and llama.cpp users pull, come from llama.cpp's quantizer
(``llama_model_quantize`` in llama-cpp-python) run on the converter's f16 file: its k-quant mixes
(which tensors get more bits) are llama.cpp's, not a re-implementation.
"""

from __future__ import annotations

import logging

from dataclasses import dataclass
from pathlib import Path

import torch

from llm_finetune.errors import ConfigError
from llm_finetune.model import load_tokenizer

BNB_VARIANTS = {"int8": 8, "nf4": 4}
GGUF_VARIANTS = {"gguf_q8_0": "q8_0", "gguf_f16": "f16", "gguf_q4_k_m": "q4_k_m", "gguf_q5_k_m": "q5_k_m"}
LLAMA_CPP_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}  # llama.cpp's quantizer


@dataclass
class Quantized:
    variant: str
    path: Path  # a from_pretrained directory, or the folder holding the .gguf file
    gguf_file: str  # file name inside path for GGUF variants, "" for bitsandbytes
    size_mb: float  # bytes of weights on disk


def bnb_config(bits: int):
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        )
    raise ConfigError([f"quantize.bits: {bits} is not 4 or 8"])


def _device_map() -> dict:
    return {"": 0} if torch.cuda.is_available() else {"": "cpu"}


def quantize(model_dir: str | Path, out_dir: str | Path, bits: int) -> Path:
    """bitsandbytes copy of ``model_dir`` in ``out_dir`` (8 = int8, 4 = nf4 with double quantization)."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(bits), device_map=_device_map())
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return out


def weights_mb(path: Path) -> float:
    files = [f for pattern in ("*.safetensors", "*.bin", "*.gguf") for f in path.glob(pattern)]
    return round(sum(f.stat().st_size for f in files) / 2**20, 2)


def quantize_variant(model_dir: str | Path, out_dir: str | Path, variant: str, name: str = "") -> Quantized:
    """Build one variant of ``quantize.variants`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if variant in BNB_VARIANTS:
        quantize(model_dir, out, BNB_VARIANTS[variant])
        return Quantized(variant, out, "", weights_mb(out))
    if variant in GGUF_VARIANTS:
        from llm_finetune.export.gguf_convert import export_gguf

        gguf_type = GGUF_VARIANTS[variant]
        file = f"{name or 'model'}-{gguf_type}.gguf"
        from llm_finetune.export.modelfile import write_modelfile

        if gguf_type in LLAMA_CPP_TYPES:  # the converter's f16, then llama.cpp's quantizer; the f16 is removed
            f16 = out / f"{name or 'model'}-f16.tmp.gguf"
            try:
                export_gguf(model_dir, f16, "f16", name=name)
                llama_cpp_quantize(f16, out / file, gguf_type)
            finally:
                f16.unlink(missing_ok=True)
        else:
            export_gguf(model_dir, out / file, gguf_type, name=name)
        write_modelfile(model_dir, out / file)  # `ollama create NAME -f Modelfile` in this folder
        return Quantized(variant, out, file, weights_mb(out))
    raise ConfigError([f"quantize.variants: {variant!r} is not one of {', '.join([*BNB_VARIANTS, *GGUF_VARIANTS])}"])


def llama_cpp_quantize(src: Path, dst: Path, gguf_type: str) -> None:
    """llama.cpp's quantizer (the library behind ``llama-quantize``) from an f16 GGUF to ``gguf_type``."""
    import ctypes

    try:
        import llama_cpp
    except ImportError as e:
        raise ConfigError([f"quantize.variants: gguf_{gguf_type} is made by llama.cpp's quantizer, which needs "
                           "llama-cpp-python; locally: pip install -c constraints.txt '.[gguf-check]'"]) from e
    from llm_finetune.cpus import available_cpus

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[gguf_type])
    params.nthread = available_cpus()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise RuntimeError(f"llama.cpp's quantizer returned {rc} turning {src} into {gguf_type}")


class _Once(logging.Filter):
    """Let a repeated library warning through once instead of on every matmul."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def _quiet_int8_cast_warning() -> None:
    # bitsandbytes logs "MatMul8bitLt: inputs will be cast ..." on every int8 matmul (thousands per evaluation)
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once("MatMul8bitLt: inputs will be cast"))


def load_quantized(model_dir: str | Path, gguf_file: str = ""):
    """Load a saved variant: bitsandbytes (its config carries the settings) or a GGUF file (de-quantized by transformers)."""
    from transformers import AutoModelForCausalLM

    _quiet_int8_cast_warning()
    if gguf_file:
        return AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(model_dir, device_map=_device_map()).eval()

"""HF model folder -> GGUF through llama.cpp's own converter (``convert_hf_to_gguf.py``).

Why llama.cpp's converter and not one of our own: this project had a 338-line exporter for the
``llama`` and ``qwen2`` architectures. Measured on tiny random models of each family users tune,
with the real vocabularies llama.cpp ships (tests/test_gguf_llamacpp.py), ours handled Llama 3.x,
Mistral, Qwen2.5 and SmolLM2 and refused Qwen3, Gemma-2/3 and Phi-3; llama.cpp's converter
handled all of them with the same logits in llama.cpp as in transformers, and registers over 200
architectures. It comes from the llama-cpp-python source release we pin
(images/fetch_llama_cpp.sh), so the converter, the quantizer (``llama_model_quantize``) and the
runtime that scores the files are one llama.cpp commit.

It identifies a BPE tokenizer's pre-tokenizer by the hash of its output on a fixed text and refuses
one it does not know. Published checkpoints (and models tuned from them) are known; a tokenizer
trained from scratch is not, and ``check_exportable`` says so before any training, on the base
model's config and tokenizer files alone (``--vocab-only``, no weights needed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from llm_finetune.errors import ConfigError

ENV = "LLAMA_CPP_DIR"
IMAGE_DIR = Path("/opt/llama.cpp")  # where images/specs.py puts it
CHECKOUT_DIR = Path(__file__).resolve().parents[2] / ".cache" / "llama.cpp"  # where `make setup` puts it
OUT_TYPES = ("f32", "f16", "bf16", "q8_0")  # what the converter writes itself; k-quants come from llama.cpp's quantizer


class GGUFExportError(ConfigError):
    """The model cannot be written as GGUF by llama.cpp's converter (unknown architecture or tokenizer)."""


def converter_dir() -> Path:
    """The folder holding ``convert_hf_to_gguf.py``: $LLAMA_CPP_DIR, the image's, or this checkout's."""
    for d in ([Path(os.environ[ENV])] if os.environ.get(ENV) else []) + [IMAGE_DIR, CHECKOUT_DIR]:
        if (d / "convert_hf_to_gguf.py").is_file():
            return d
    raise GGUFExportError([
        "quantize.variants: GGUF variants are written by llama.cpp's convert_hf_to_gguf.py, which is not installed "
        f"(looked in ${ENV}, {IMAGE_DIR} and {CHECKOUT_DIR}); run `make setup` (or "
        "`sh images/fetch_llama_cpp.sh .cache/llama.cpp`), or drop the gguf_* variants"])


def _run(args: list[str]) -> subprocess.CompletedProcess:
    # the converter imports its own gguf-py (same version as our pin); NO_LOCAL_GGUF would use the installed one
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    return subprocess.run([sys.executable, str(converter_dir() / "convert_hf_to_gguf.py"), *args],
                          capture_output=True, text=True, env=env)


def _why(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln.split(":", 1)[0]]
    return (errors or lines or ["(no output)"])[-1].strip()


def _refusal(model_dir: Path, why: str) -> GGUFExportError:
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}  # the converter's error says why
    arch = ", ".join(config.get("architectures") or [config.get("model_type", "no config.json")])
    hint = ("its tokenizer's pre-tokenizer is not one llama.cpp knows (a tokenizer trained from scratch or edited); "
            "keep the published tokenizer of the base model" if "pre-tokenizer" in why else
            "llama.cpp does not convert this architecture" if "not supported" in why else "")
    return GGUFExportError([f"GGUF export of {model_dir} ({arch}) failed in llama.cpp's converter: {why}"
                            + (f"; {hint}" if hint else "") + ". Fix: drop the gguf_* entries from quantize.variants "
                            "(int8/nf4 still work), or tune a base model llama.cpp supports"])


def check_exportable(model_dir: str | Path) -> dict:
    """Convert the vocabulary and hyperparameters only (no weights read): fails fast, before training,
    for an architecture or tokenizer llama.cpp cannot write. Returns the model's config.json."""
    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp) / "meta"  # config and tokenizer files only: with a weight index it would open the shards
        meta.mkdir()
        for f in model_dir.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".gguf", ".index.json")):
                shutil.copy(f, meta / f.name)
        proc = _run([str(meta), "--vocab-only", "--outfile", str(Path(tmp) / "vocab.gguf")])
    if proc.returncode != 0:
        raise _refusal(model_dir, _why(proc))
    return json.loads((model_dir / "config.json").read_text())


def export_gguf(model_dir: str | Path, out_file: str | Path, gguf_type: str = "q8_0", name: str = "") -> Path:
    """Write ``model_dir`` (safetensors + tokenizer files) as one GGUF file of ``gguf_type``."""
    if gguf_type not in OUT_TYPES:
        raise ValueError(f"llama.cpp's converter writes {', '.join(OUT_TYPES)}, not {gguf_type!r}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    proc = _run([str(model_dir), "--outfile", str(out_file), "--outtype", gguf_type, *(["--model-name", name] if name else [])])
    if proc.returncode != 0 or not out_file.is_file():
        raise _refusal(model_dir, _why(proc))
    return out_file

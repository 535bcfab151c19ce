"""Quantize a merged model with bitsandbytes (int8 or nf4) and save it for ``from_pretrained``.

bitsandbytes >= 0.45 runs these kernels on CPU too, so the default pipeline quantizes on
a laptop; on a GPU the same code uses the CUDA kernels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm_finetune.errors import ConfigError
from llm_finetune.model import load_tokenizer


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


def quantize(model_dir: str | Path, out_dir: str | Path, bits: int) -> Path:
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    device = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(bits), device_map=device)
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return out


def load_quantized(model_dir: str | Path):
    """Load a saved bitsandbytes model (its config carries the quantization settings)."""
    from transformers import AutoModelForCausalLM

    device = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(model_dir, device_map=device)

"""What every evaluator needs (``evaluate`` for SFT rows, ``preference_eval`` for pairs): the model
under test loaded as it was saved (float, bitsandbytes, or a GGUF file), its tokenizer, and greedy
generation that stops on the model's stop list. Below both, so neither imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm_finetune.evaluation.generation import greedy_with_cuts
from llm_finetune.model import load_tokenizer


def load_model(model_dir: str | Path, gguf_file: str = ""):
    """Float model for evaluation; bitsandbytes directories and GGUF files load as saved."""
    from transformers import AutoModelForCausalLM

    from llm_finetune.export.quantize import load_quantized

    config = Path(model_dir) / "config.json"
    if gguf_file or (config.is_file() and "quantization_config" in json.loads(config.read_text())):
        return load_quantized(model_dir, gguf_file)
    kwargs = {"dtype": torch.bfloat16 if torch.cuda.is_available() else torch.float32}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> tuple[list[str], list[bool]]:
    """Greedy completions that stop at any of the model's stop tokens (generation.py), and which were cut."""
    return greedy_with_cuts(model, tokenizer, prompts, max_new_tokens, batch_size)


def eval_tokenizer(model_dir: str | Path, gguf_file: str):
    if not gguf_file:
        return load_tokenizer(model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)  # the GGUF's own vocabulary and template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok

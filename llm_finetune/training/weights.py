"""The weights a run trains (``train.weights``): LoRA adapters on a frozen base, QLoRA's on a 4-bit base,
or every weight; and merging an adapter back into a full-precision base afterwards."""

from __future__ import annotations

from pathlib import Path

import torch

from llm_finetune.config import TrainConfig
from llm_finetune.errors import ConfigError
from llm_finetune.model import load_tokenizer
from llm_finetune.training.distributed import local_rank
from llm_finetune.training.precision import use_fp16


def lora_config(cfg: TrainConfig):
    """PEFT's LoraConfig from ``train.lora``; None when every weight trains."""
    if cfg.weights == "full":
        return None
    from peft import LoraConfig

    targets = cfg.lora.target_modules
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )


def weights_dtype(cfg: TrainConfig, bf16: bool) -> torch.dtype:
    """The dtype the weights are loaded in: LoRA's and QLoRA's frozen base in the half precision training
    uses, full fine-tuning's fp32 master weights (autocast computes in half precision). The GPU benchmark's
    "ours" rows load with this too (bench/train_speed.py), so they measure what ships."""
    half = torch.bfloat16 if bf16 else torch.float16 if use_fp16(cfg) else None
    return half if (half is not None and cfg.weights != "full") else torch.float32


def load_model(model_dir: Path, cfg: TrainConfig, bf16: bool, attn_implementation: str = "sdpa", wrap: bool = True):
    """The model to train, and the LoRA config when the trainer wraps it itself.

    The frozen base of LoRA is held in the half precision training uses (PEFT keeps the adapters in
    fp32); full fine-tuning keeps fp32 master weights under autocast. ``wrap``: add the adapters here
    (returns ``(peft_model, None)``); False: return ``(base, lora_config)`` for a trainer that wraps the
    model itself (TRL's preference trainers, whose reference is then the adapter-disabled base).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": weights_dtype(cfg, bf16), "attn_implementation": attn_implementation}
    if attn_implementation == "flex_attention":  # q, k, v of one dtype under autocast (attention.py)
        from llm_finetune.training.attention import register

        register()
    if cfg.weights == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16,
        )
        kwargs["device_map"] = {"": local_rank()}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    lora = lora_config(cfg)
    if lora is None:
        return model, None
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.weights == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if not wrap:
        return model, lora
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise ConfigError([f"train.lora.target_modules: {cfg.lora.target_modules} does not match this model's layers: {e}"]) from None
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model, None


def merge_adapter(base_model_dir: Path, adapter_dir: Path, out_dir: Path, bf16: bool = False) -> Path:
    """Merge a LoRA adapter into a freshly loaded full-precision base (never into 4-bit weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    has_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    load_tokenizer(adapter_dir if has_tokenizer else base_model_dir).save_pretrained(out_dir)
    return out_dir

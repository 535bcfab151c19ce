"""Supervised fine-tuning and continued pre-training on one or many processes.

Runs under torchrun / Flyte's Elastic plugin (RANK, WORLD_SIZE, MASTER_ADDR set) or as a
single process. The HF Trainer does the loop: DDP (gloo on CPU, NCCL on GPU), DeepSpeed
ZeRO through a JSON config, gradient accumulation with the loss normalised by the number
of trained tokens. LoRA adapters are merged into a freshly loaded fp32/bf16 base after
training, never into quantized weights.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from llm_finetune.collate import TokenCollator, model_inputs
from llm_finetune.config import DataConfig, TrainConfig
from llm_finetune.encoding import IGNORE_INDEX, encode_row
from llm_finetune.errors import ConfigError
from llm_finetune.model import load_tokenizer


@dataclass
class TrainSummary:
    method: str
    steps: int
    world_size: int
    first_loss: float
    final_loss: float
    runtime_s: float
    trained_tokens: int
    tokens_per_s: float
    log_history: list[dict] = field(default_factory=list)


@dataclass
class TrainOutputs:
    model_dir: Path  # merged (LoRA) or fully fine-tuned model
    adapter_dir: Path | None  # LoRA adapter, None for full fine-tuning
    summary: TrainSummary


def encode_frame(tokenizer, frame: pd.DataFrame, data_cfg: DataConfig) -> list[dict]:
    """Training examples from get_data's token rows, or by encoding canonical rows.

    Token rows (``input_ids``, ``labels``, ``seq_lens``; packed or not) are used as they
    are. Canonical rows are encoded here; text is cut into ``max_length`` blocks.
    """
    if "input_ids" in frame.columns:
        return [
            {"input_ids": list(r["input_ids"]), "labels": list(r["labels"]), "seq_lens": [int(x) for x in r["seq_lens"]]}
            for r in frame.to_dict(orient="records")
        ]
    out = []
    for row in frame.to_dict(orient="records"):
        enc = encode_row(tokenizer, row, train_on_prompt=data_cfg.train_on_prompt, template=data_cfg.prompt_template)
        n = data_cfg.max_length
        for start in range(0, len(enc.input_ids), n):
            ids, labels = enc.input_ids[start : start + n], enc.labels[start : start + n]
            if any(x != IGNORE_INDEX for x in labels):
                out.append({"input_ids": ids, "labels": labels})
    return out


PadCollator = TokenCollator  # the padding baseline: one example per row, 2D attention mask


def attention_implementation(packed: bool) -> str:
    """Flex attention skips the masked blocks of packed rows on GPU; SDPA elsewhere."""
    if packed and torch.cuda.is_available():
        return "flex_attention"
    return "sdpa"


def _trainer_class():
    from transformers import Trainer

    class PackingAwareTrainer(Trainer):
        """Turns a packed batch's document ids into the mask the model's attention needs."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, model_inputs(model, inputs), return_outputs, num_items_in_batch)

    return PackingAwareTrainer


def _use_bf16(cfg: TrainConfig) -> bool:
    if cfg.precision == "bf16":
        return True
    if cfg.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def _check_hardware(cfg: TrainConfig) -> None:
    if cfg.method == "qlora" and not torch.cuda.is_available():
        raise ConfigError(["train.method: qlora needs a CUDA GPU, and this process sees none; use lora on CPU"])
    if cfg.precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise ConfigError([f"train.precision: {cfg.precision} needs a CUDA GPU, and this process sees none"])


def _load_model(model_dir: Path, cfg: TrainConfig, bf16: bool, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if (bf16 and cfg.method != "full") else torch.float32
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if cfg.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16,
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if cfg.method == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    targets = cfg.lora.target_modules
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise ConfigError([f"train.lora.target_modules: {targets} does not match this model's layers: {e}"]) from None
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed() -> None:
    """Join the process group torchrun/Elastic described in the environment (gloo on CPU, NCCL on GPU)."""
    import torch.distributed as dist

    if _world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def train(
    base_model_dir: str | Path,
    train_frame: pd.DataFrame,
    data_cfg: DataConfig,
    cfg: TrainConfig,
    output_dir: str | Path,
    deepspeed_config: str | Path | None = None,
) -> TrainOutputs | None:
    """Train and, on rank 0, write ``model/`` (and ``adapter/`` for LoRA) under ``output_dir``.

    Returns the outputs on global rank 0 and None on the other ranks.
    """
    from transformers import TrainingArguments, set_seed

    _check_hardware(cfg)
    _init_distributed()
    base_model_dir, output_dir = Path(base_model_dir), Path(output_dir)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(base_model_dir)
    examples = encode_frame(tokenizer, train_frame, data_cfg)
    bf16 = _use_bf16(cfg)
    on_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.num_epochs,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16 and cfg.method == "full",
        fp16=cfg.precision == "fp16",
        gradient_checkpointing=cfg.gradient_checkpointing,
        use_cpu=on_cpu,
        ddp_backend=("gloo" if on_cpu else "nccl") if _world_size() > 1 else None,
        dataloader_pin_memory=not on_cpu,
        remove_unused_columns=False,
        label_names=["labels"],
        deepspeed=str(deepspeed_config) if deepspeed_config else None,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    packed = data_cfg.packing and "seq_lens" in (examples[0] if examples else {})
    model = _load_model(base_model_dir, cfg, bf16, attention_implementation(packed))
    collator = TokenCollator(tokenizer.pad_token_id, packed=packed)
    trainer = _trainer_class()(model=model, args=args, train_dataset=examples, data_collator=collator)
    start = time.perf_counter()
    result = trainer.train()
    runtime = time.perf_counter() - start
    trained_tokens = _all_reduce_sum(collator.trained_tokens)

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = TrainSummary(
        method=cfg.method,
        steps=int(result.global_step),
        world_size=int(args.world_size),
        first_loss=float(losses[0]) if losses else math.nan,
        final_loss=float(losses[-1]) if losses else math.nan,
        runtime_s=runtime,
        trained_tokens=trained_tokens,
        tokens_per_s=trained_tokens / runtime if runtime > 0 else 0.0,
        log_history=[{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in trainer.state.log_history],
    )
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"training loss became NaN/inf: {losses}; lower train.learning_rate or check the data")

    model_out = output_dir / "model"
    adapter_out = output_dir / "adapter" if cfg.method != "full" else None
    trainer.save_model(str(adapter_out or model_out))  # all ranks: DeepSpeed ZeRO-3 gathers here
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(adapter_out or model_out)
        if adapter_out is not None:
            merge_adapter(base_model_dir, adapter_out, model_out, bf16=bf16)
        (output_dir / "train_summary.json").write_text(json.dumps(asdict(summary), indent=2))
    _barrier()
    if _rank() != 0:
        return None
    return TrainOutputs(model_out, adapter_out, summary)


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


def _all_reduce_sum(value: int) -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(t)
        return int(t.item())
    return value


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()

"""Preference tuning: DPO (and TRL's loss variants: IPO, hinge, robust, APO, ...) on chosen/rejected pairs.

TRL's ``DPOTrainer`` computes the loss, the reference log-probabilities and the reward
metrics; this module runs it inside the same harness as supervised training (train.py):
torchrun / Elastic processes (gloo on CPU, NCCL on GPU), DeepSpeed ZeRO through the same
JSON configs, the memory check before any weight is loaded, the checkpoint store with
resume (checkpoint.py), the resource sampler, validation every ``train.eval_steps`` with
the best checkpoint returned, sample generations, and the same outputs (``adapter/``,
merged ``model/``, ``train_summary.json``) so evaluation, quantization and publishing
need no change.

The reference model (``train.dpo.reference: auto``):
- LoRA / QLoRA: the policy with its adapter disabled, so no second copy of the weights is
  loaded (TRL does this when it wraps the model with the ``peft_config`` itself);
- full: TRL loads a frozen copy of the starting model (``base_model_dir``), under ZeRO
  wrapped in an inference engine so it is sharded like the policy.

Pairs arrive tokenized by get_data (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, see
data/preference.py) with the same templates as SFT, so ``PreferenceTrainer`` skips TRL's
own tokenization of the dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

import pandas as pd
import torch

from llm_finetune.checkpoint_upload import BackgroundUploader
from llm_finetune.config import DataConfig, TrainConfig, micro_batch
from llm_finetune.data.preference import encode_pairs
from llm_finetune.encoding import prompt_and_reference
from llm_finetune.errors import ConfigError, DataError
from llm_finetune.fit import GiB, check_fits, count_parameters, deepspeed_offload
from llm_finetune.model import load_tokenizer
from llm_finetune.resources import ResourceSampler
from llm_finetune.train import (
    TrainOutputs,
    _check_hardware,
    _init_distributed,
    _local_rank,
    _nnodes,
    _node_rank,
    _rank,
    _restore,
    _shared_output_dir,
    _training_deepspeed_config,
    _use_bf16,
    _use_fp16,
    _world_size,
    _zero_stage,
    save_outputs,
    train_summary,
)
from llm_finetune.trainer import CheckpointUploader, SampleGenerations

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# what the train deck plots from TRL's logs (train and eval_ prefixed)
REWARD_METRICS = ("rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies")


def weights_config(cfg: TrainConfig) -> TrainConfig:
    """The TrainConfig as supervised training sees it: ``method`` = the weights DPO trains."""
    return dataclasses.replace(cfg, method=cfg.dpo.weights)


def pair_examples(tokenizer, frame: pd.DataFrame, data_cfg: DataConfig) -> list[dict]:
    """Tokenized pairs from get_data's token rows, or by encoding canonical preference rows."""
    if "prompt_ids" in frame.columns:
        return [{k: [int(x) for x in r[k]] for k in PAIR_COLUMNS} for r in frame.to_dict(orient="records")]
    if not {"chosen", "rejected"} <= set(frame.columns):
        raise DataError(
            "train.method: dpo needs preference pairs (prompt/chosen/rejected), but the training data has columns "
            f"{', '.join(map(str, frame.columns))}; set data.format: preference (or auto) and point data.source at pairs, "
            "or use train.method: lora / full for supervised data"
        )
    return [{k: e[k] for k in PAIR_COLUMNS} for e in encode_pairs(tokenizer, frame, data_cfg)]


def sample_prompts(tokenizer, frame: pd.DataFrame, data_cfg: DataConfig, n: int) -> list[tuple[str, str]]:
    """(generation prompt, chosen answer) for the first ``n`` held-out pairs."""
    out = []
    for row in frame.head(n).to_dict(orient="records"):
        conv = json.loads(row["prompt"]) + [{"role": "assistant", "content": row["chosen"]}]
        out.append(prompt_and_reference(tokenizer, conv, data_cfg.prompt_template))
    return out


def _check_memory(model_dir: Path, cfg: TrainConfig, bf16: bool, deepspeed_config) -> None:
    """train.py's fit check, plus the frozen reference copy that full DPO holds (sharded under ZeRO-3)."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(_local_rank())
        available, device = props.total_memory, f"GPU {props.name}"
        offload = deepspeed_offload(deepspeed_config)
    else:
        import psutil

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        available, device = psutil.virtual_memory().total / local, f"this machine's RAM shared by {local} process(es)"
        offload = False
    n_params = count_parameters(model_dir)
    reference = 0.0
    if cfg.method == "full":
        reference = n_params * (2 if bf16 else 4) / (max(_world_size(), 1) if _zero_stage(deepspeed_config) == 3 else 1)
    try:
        check_fits(n_params, cfg.method, bf16, _zero_stage(deepspeed_config), _world_size(), offload,
                   available - reference, device + (f" after the {reference / GiB:.1f} GiB reference copy" if reference else ""))
    except ConfigError as e:
        raise ConfigError([p + "; LoRA DPO (train.dpo.weights: lora) needs no reference copy" for p in e.problems]) from None


def _load_policy(model_dir: Path, cfg: TrainConfig, bf16: bool):
    """The plain model and, for LoRA/QLoRA, the adapter config TRL wraps it with (so the reference is the
    adapter-disabled base, not a second adapter)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if (bf16 and cfg.method != "full") else torch.float32
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if cfg.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16,
        )
        kwargs["device_map"] = {"": _local_rank()}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if cfg.method == "full":
        return model, None
    from peft import LoraConfig, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    targets = cfg.lora.target_modules
    return model, LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets), task_type="CAUSAL_LM",
    )


def _trainer_class():
    from trl import DPOTrainer

    class PreferenceTrainer(DPOTrainer):
        """TRL's DPOTrainer on pairs tokenized by get_data, stopping at the first non-finite loss."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if set(PAIR_COLUMNS) <= set(dataset.column_names):
                return dataset  # tokenized with our chat/named templates (data/preference.py)
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
            if model.training and not torch.isfinite(loss.detach()).all():
                raise FloatingPointError(
                    f"DPO loss is {loss.item()} at step {self.state.global_step + 1} (rank {self.args.process_index}); "
                    "stopped at the first non-finite loss. Lower train.learning_rate or raise train.dpo.beta, or check "
                    "the pairs for empty answers"
                )
            return out

    return PreferenceTrainer


def train_dpo(
    base_model_dir: str | Path,
    train_frame: pd.DataFrame,
    data_cfg: DataConfig,
    cfg: TrainConfig,
    output_dir: str | Path | None = None,
    deepspeed_config: str | Path | None = None,
    eval_frame: pd.DataFrame | None = None,
    checkpoint_store=None,
    callbacks: tuple = (),
) -> TrainOutputs | None:
    """DPO-train the model in ``base_model_dir`` (a base or an SFT output) on preference pairs.

    Same contract as ``train.train``: rank 0 writes ``model/`` (and ``adapter/`` for LoRA) and
    ``train_summary.json`` under ``output_dir`` and gets the outputs; other ranks get None.
    ``train_frame``: get_data's pair token rows (or canonical pairs); ``eval_frame``: held-out
    canonical pairs, for the validation DPO loss, reward metrics, best checkpoint and samples.
    """
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig

    if cfg.method != "dpo":
        raise ConfigError([f"train.method: train_dpo runs DPO, got {cfg.method!r}"])
    wcfg = weights_config(cfg)
    _check_hardware(wcfg)
    base_model_dir = Path(base_model_dir)
    bf16 = _use_bf16(wcfg)
    _check_memory(base_model_dir, wcfg, bf16 or _use_fp16(wcfg), deepspeed_config)  # half-precision weights
    _init_distributed(cfg.collective_timeout_s, deepspeed=bool(deepspeed_config))
    output_dir = _shared_output_dir(output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(base_model_dir)
    examples = pair_examples(tokenizer, train_frame, data_cfg)
    has_eval = eval_frame is not None and len(eval_frame) > 0 and cfg.eval_steps > 0
    eval_examples = None
    if has_eval:
        rows = eval_frame if cfg.eval_max_samples == 0 else eval_frame.head(cfg.eval_max_samples)
        eval_examples = Dataset.from_list(pair_examples(tokenizer, rows, data_cfg))
    keep_best = has_eval and cfg.save_steps > 0
    on_cpu = not torch.cuda.is_available()
    args = DPOConfig(
        output_dir=str(checkpoints_dir),
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.num_epochs,
        per_device_train_batch_size=micro_batch(cfg),
        per_device_eval_batch_size=micro_batch(cfg),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2 if cfg.save_steps > 0 else None,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps if has_eval else None,
        load_best_model_at_end=keep_best,
        metric_for_best_model="eval_loss" if keep_best else None,
        greater_is_better=False if keep_best else None,
        prediction_loss_only=True,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        fp16=_use_fp16(cfg),
        gradient_checkpointing=cfg.gradient_checkpointing,  # TRL's default is on; ours follows the config
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        use_cpu=on_cpu,
        ddp_backend=("gloo" if on_cpu else "nccl") if _world_size() > 1 else None,
        ddp_timeout=cfg.collective_timeout_s,
        dataloader_pin_memory=not on_cpu,
        remove_unused_columns=False,
        deepspeed=_training_deepspeed_config(deepspeed_config, _nnodes() > 1),
        save_on_each_node=_nnodes() > 1,  # every node's disk holds a full checkpoint (its own shards)
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
        # DPO
        beta=cfg.dpo.beta,
        loss_type=[cfg.dpo.loss_type],
        label_smoothing=cfg.dpo.label_smoothing,
        max_length=None,  # lengths were validated (or truncated) by get_data
        precompute_ref_log_probs=False,
        disable_dropout=True,
    )
    model, peft_config = _load_policy(base_model_dir, wcfg, bf16)
    # checkpoints reach the store exactly as in train.py: one background uploader per node, node 0 prunes
    uploads = None
    if checkpoint_store is not None and _local_rank() == 0:
        uploads = BackgroundUploader(checkpoint_store, output_dir / "upload-staging", cfg.keep_checkpoints,
                                     prune=_node_rank() == 0, nnodes=_nnodes())
    node_ranks = range(_rank() - _local_rank(), _rank() - _local_rank() + int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    uploader = CheckpointUploader(uploads, checkpoints_dir, _node_rank(), _nnodes(), node_ranks)
    samples = SampleGenerations(
        tokenizer,
        sample_prompts(tokenizer, eval_frame, data_cfg, cfg.sample_prompts) if has_eval and "prompt" in eval_frame else [],
        cfg.sample_max_new_tokens,
        zero3=_zero_stage(deepspeed_config) == 3,
    )
    trainer = _trainer_class()(
        model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(examples), eval_dataset=eval_examples,
        processing_class=tokenizer, peft_config=peft_config, callbacks=[uploader, samples, *callbacks],
    )
    resume = _restore(checkpoint_store, checkpoints_dir)
    if resume is not None and _rank() == 0:
        print(f"[train_dpo] resuming from {resume.name} (checkpoint store)", flush=True)
    if resume is not None and uploads is not None and uploads.prune and not checkpoint_store.contains_complete(resume.name):
        uploads.submit(resume)  # carried into this attempt's store prefix, in case this attempt saves none
    sampler = ResourceSampler(cfg.profile_interval_s) if _rank() == 0 else contextlib.nullcontext()
    start = time.perf_counter()
    try:
        with sampler:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException:
        if uploads is not None:  # a checkpoint saved just before the failure still reaches the store
            try:
                uploads.close(wait_for_nodes=False)
            except Exception as e:
                print(f"[train_dpo] checkpoint upload after the failure also failed: {type(e).__name__}: {e}", flush=True)
        raise
    runtime = time.perf_counter() - start

    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    summary = train_summary(f"dpo ({cfg.dpo.weights}, loss {cfg.dpo.loss_type}, beta {cfg.dpo.beta})", trainer, result,
                            runtime, int(tokens[-1]) if tokens else 0, keep_best, resume, samples.rows, sampler)
    return save_outputs(trainer, tokenizer, output_dir, wcfg.method == "full", base_model_dir, deepspeed_config, bf16,
                        summary, uploads)

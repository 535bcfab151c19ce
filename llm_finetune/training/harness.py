"""The one training harness: every method (the registry, methods.py) runs through ``train``.

Runs under torchrun / Flyte's Elastic plugin (RANK, WORLD_SIZE, MASTER_ADDR set) or as a
single process. A Hugging Face or TRL trainer does the loop: DDP (gloo on CPU, NCCL on GPU),
DeepSpeed ZeRO through a JSON config or FSDP2 (``train.sharding``, fsdp.py), gradient accumulation.
What every method shares lives here, once:

- the hardware and memory checks, before any weight is loaded (the frozen reference copy a
  full-weight preference run holds is counted);
- the trainer arguments built from ``TrainConfig`` (``trainer_arguments``), for any
  ``TrainingArguments`` subclass (TRL's DPOConfig, KTOConfig, ...);
- the weights (``train.weights``: LoRA, QLoRA, full; training/weights.py);
- checkpoints: every ``train.save_steps`` to the checkpoint store (checkpoint.py), and a new
  attempt resumes from the newest one complete on every node with optimizer, scheduler, RNG
  and data position restored; validation every ``train.eval_steps`` with the best checkpoint
  by validation loss returned, early stopping, sample generations;
- the outputs: ``adapter/`` (LoRA) merged into a freshly loaded base as ``model/``, and
  ``train_summary.json``.

A method is a ``Recipe`` (training/recipes/): its rows, its trainer class and arguments, its
metrics. Adding one is a recipe file and a registry entry (docs/training.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from llm_finetune.training.checkpoint import checkpoint_step, complete_checkpoints, relocate
from llm_finetune.training.checkpoint_upload import BackgroundUploader
from llm_finetune.config import DataConfig, TrainConfig, micro_batch
from llm_finetune.errors import ConfigError
from llm_finetune.training import fsdp
from llm_finetune.training.fit import GiB, check_fits, count_parameters, deepspeed_offload
from llm_finetune.methods import load_recipe, method_spec
from llm_finetune.model import load_tokenizer
from llm_finetune.training.node_once import run_once_per_node
from llm_finetune.training.resources import ResourceSampler
from llm_finetune.training.trainer import CheckpointUploader, SampleGenerations
from llm_finetune.training.distributed import (
    FINAL_WAIT_S, init_distributed, local_rank, local_world_size, nnodes, node_rank, rank, shared_output_dir,
    wait_for_rank0, world_size,
)
from llm_finetune.training.precision import attention_implementation, check_hardware, use_bf16, use_fp16
from llm_finetune.training.weights import load_model, merge_adapter


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
    best_step: int = -1  # step of the returned checkpoint (-1: the last step, no validation)
    best_eval_loss: float = math.nan
    resumed_from_step: int = 0  # 0: started from scratch
    samples: list[dict] = field(default_factory=list)  # generations per evaluation
    resource_profile: list[dict] = field(default_factory=list)
    deepspeed_config: dict = field(default_factory=dict)  # as resolved ("auto" filled) by the Trainer


@dataclass
class TrainOutputs:
    model_dir: Path  # merged (LoRA) or fully fine-tuned model
    adapter_dir: Path | None  # LoRA adapter, None for full fine-tuning
    summary: TrainSummary


class Recipe:
    """What a training method declares; ``train`` does everything else.

    ``wraps_lora``: True when the harness adds the LoRA adapters; False when the trainer takes the
    LoRA config and wraps the model itself (TRL's preference trainers: their reference model is then
    the adapter-disabled base, no second copy of the weights).
    """

    wraps_lora = True

    def examples(self, tokenizer, frame: pd.DataFrame, data_cfg: DataConfig):
        """The trainer's dataset from get_data's token rows (or canonical rows)."""
        raise NotImplementedError

    def collator(self, tokenizer, examples, data_cfg: DataConfig):
        """The data collator, or None for the trainer's own."""
        return None

    def packed(self, collator) -> bool:
        """Whether rows are packed (attention must then keep the examples apart)."""
        return False

    def sample_prompts(self, tokenizer, frame: pd.DataFrame, data_cfg: DataConfig, n: int) -> list[tuple[str, str]]:
        """(prompt, reference) of the first ``n`` held-out rows, generated at every evaluation."""
        return []

    def arguments(self, cfg: TrainConfig) -> tuple[type, dict]:
        """The trainer's arguments class and the method's own keys in it."""
        from transformers import TrainingArguments

        return TrainingArguments, {}

    def trainer(self, *, model, args, train_dataset, eval_dataset, collator, tokenizer, peft_config, callbacks):
        raise NotImplementedError

    def label(self, cfg: TrainConfig) -> str:
        """How the run is named in the summary, deck and tracking."""
        return f"{cfg.method} ({cfg.weights})"

    def trained_tokens(self, trainer) -> int:
        """Tokens trained on, all ranks (TRL trainers log ``num_tokens``)."""
        tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
        return int(tokens[-1]) if tokens else 0


class StopAtNonFiniteLoss:
    """Mixin for a TRL trainer: stop at the first non-finite training loss with the step, the rank and
    ``nonfinite_hint`` (what to change). Our SFT trainer (trainer.py) has the same guard built in."""

    nonfinite_hint = ""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = out[0] if return_outputs else out
        if model.training and not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"{self.args.__class__.__name__.removesuffix('Config')} loss is {loss.item()} at step "
                f"{self.state.global_step + 1} (rank {self.args.process_index}); stopped at the first non-finite loss. "
                f"{self.nonfinite_hint}"
            )
        return out


def trainer_arguments(cfg: TrainConfig, checkpoints_dir: Path, has_eval: bool, keep_best: bool, bf16: bool,
                      deepspeed_config) -> dict:
    """The arguments every trainer takes, from the run config (a recipe adds its own keys)."""
    on_cpu = not torch.cuda.is_available()
    args = dict(
        output_dir=str(checkpoints_dir),
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.num_epochs,
        per_device_train_batch_size=micro_batch(cfg),
        per_device_eval_batch_size=micro_batch(cfg),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2 if cfg.save_steps > 0 else None,  # the latest and the best
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
        fp16=use_fp16(cfg),
        gradient_checkpointing=cfg.gradient_checkpointing,  # TRL's trainers default to on; ours follow the config
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        use_cpu=on_cpu,
        ddp_backend=("gloo" if on_cpu else "nccl") if world_size() > 1 else None,
        ddp_timeout=cfg.collective_timeout_s,
        dataloader_pin_memory=not on_cpu,
        remove_unused_columns=False,
        deepspeed=_training_deepspeed_config(deepspeed_config, nnodes() > 1),
        save_on_each_node=nnodes() > 1,  # every node's disk holds a full checkpoint (its own shards)
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    return {**args, **fsdp.fsdp_arguments(cfg)}  # train.sharding: fsdp2 (full weights: FSDP's activation checkpointing)


def restore(store, checkpoints_dir: Path) -> Path | None:
    """Fetch the store's checkpoints (once per node) and return the newest one complete on every node.

    The download runs under a node file lock, not inside a collective, so its length is not
    bounded by ``train.collective_timeout_s``; newer partial or corrupt checkpoints are
    skipped with a warning (checkpoint.py).
    """
    import uuid

    import torch.distributed as dist

    if store is None:
        return None
    distributed = dist.is_available() and dist.is_initialized()
    token = [uuid.uuid4().hex]  # one restore per launch, even into a reused directory
    if distributed:
        dist.broadcast_object_list(token, src=0)

    def fetch() -> None:
        shutil.rmtree(checkpoints_dir, ignore_errors=True)  # only what the store holds is trusted
        checkpoints_dir.mkdir(parents=True)
        if store.restore(checkpoints_dir) is not None:
            relocate(checkpoints_dir)

    run_once_per_node(checkpoints_dir.parent / f".restored-{token[0]}", fetch)
    steps = [checkpoint_step(p) for p in complete_checkpoints(checkpoints_dir)] if local_rank() == 0 else None
    if distributed:  # the newest step every node holds complete (nodes download separately)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, steps)
        per_node = [set(s) for s in gathered if s is not None]
        steps = sorted(set.intersection(*per_node)) if per_node else []
    return checkpoints_dir / f"checkpoint-{max(steps)}" if steps else None


def _training_deepspeed_config(deepspeed_config: str | Path | None, multi_node: bool):
    """Multi-node: every node keeps a complete ZeRO checkpoint on its own disk (``use_node_local_storage``).

    Without it only global rank 0 writes the model states and ``latest``, which the other
    nodes need to load the best checkpoint at the end of training.
    """
    if not deepspeed_config or not multi_node:
        return str(deepspeed_config) if deepspeed_config else None
    ds = json.loads(Path(deepspeed_config).read_text())
    ds.setdefault("checkpoint", {})["use_node_local_storage"] = True
    return ds


def zero_stage(deepspeed_config: str | Path | None) -> int:
    if not deepspeed_config:
        return 0
    return int(json.loads(Path(deepspeed_config).read_text()).get("zero_optimization", {}).get("stage", 0))


def sharding_stage(cfg: TrainConfig, deepspeed_config) -> int:
    """The ZeRO stage the run's sharding amounts to: FSDP2 shards weights, gradients and optimizer states as ZeRO-3."""
    return 3 if fsdp.enabled(cfg) else zero_stage(deepspeed_config)


def check_memory(model_dir: Path, cfg: TrainConfig, half: bool, deepspeed_config) -> None:
    """Refuse a run whose weights, gradients and optimizer states alone exceed the device (fit.py), with the
    frozen reference copy a full-weight run of a method that compares against its starting model holds
    (sharded under ZeRO-3 and FSDP2; LoRA runs use the adapter-disabled base and hold none)."""
    stage = sharding_stage(cfg, deepspeed_config)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(local_rank())
        available, device = props.total_memory, f"GPU {props.name}"
        offload = cfg.fsdp.cpu_offload if fsdp.enabled(cfg) else deepspeed_offload(deepspeed_config)
    else:
        import psutil

        local = local_world_size()
        available, device = psutil.virtual_memory().total / local, f"this machine's RAM shared by {local} process(es)"
        offload = False  # offloading to CPU memory saves nothing when training in it
    n_params = count_parameters(model_dir)
    reference = 0.0
    if method_spec(cfg.method).reference_copy and cfg.weights == "full":
        reference = n_params * (2 if half else 4) / (max(world_size(), 1) if stage == 3 else 1)
    try:
        check_fits(n_params, cfg.weights, half, stage, world_size(), offload, available - reference,
                   device + (f" after the {reference / GiB:.1f} GiB reference copy" if reference else ""))
    except ConfigError as e:
        if not reference:
            raise
        raise ConfigError([p + f"; {cfg.method} with train.weights: lora needs no reference copy" for p in e.problems]) from None


def train(
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
    """Train ``train.method`` on ``train.weights`` and, on rank 0, write ``model/`` (and ``adapter/`` for LoRA).

    ``output_dir`` None: a fresh temporary directory (rank 0's, shared with all ranks).
    ``checkpoint_store``: see checkpoint.py; when it holds a checkpoint, training resumes from it.
    ``eval_frame``: validation rows for validation loss, best-checkpoint choice, early stopping
    (``train.early_stopping_patience``) and sample generations; never the test rows.
    ``callbacks``: extra ``TrainerCallback``s (tests inject failures with them).
    Returns the outputs on global rank 0 and None on the other ranks.
    """
    from transformers import set_seed

    recipe = load_recipe(cfg.method).RECIPE
    check_hardware(cfg)
    base_model_dir = Path(base_model_dir)
    bf16 = use_bf16(cfg)
    check_memory(base_model_dir, cfg, bf16 or use_fp16(cfg), deepspeed_config)  # half-precision weights
    init_distributed(cfg.collective_timeout_s, deepspeed=bool(deepspeed_config))
    output_dir = shared_output_dir(output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(base_model_dir)
    examples = recipe.examples(tokenizer, train_frame, data_cfg)
    has_eval = eval_frame is not None and len(eval_frame) > 0 and cfg.eval_steps > 0
    eval_examples = None
    if has_eval:
        rows = eval_frame if cfg.eval_max_samples == 0 else eval_frame.head(cfg.eval_max_samples)
        eval_examples = recipe.examples(tokenizer, rows, data_cfg)
    keep_best = has_eval and cfg.save_steps > 0
    collator = recipe.collator(tokenizer, examples, data_cfg)
    args_class, method_args = recipe.arguments(cfg)
    args = args_class(**trainer_arguments(cfg, checkpoints_dir, has_eval, keep_best, bf16, deepspeed_config), **method_args)
    model, peft_config = load_model(base_model_dir, cfg, bf16, attention_implementation(recipe.packed(collator)),
                                    wrap=recipe.wraps_lora)
    uploads = None
    if checkpoint_store is not None and local_rank() == 0:  # one uploader per node, node 0 prunes
        uploads = BackgroundUploader(checkpoint_store, output_dir / "upload-staging", cfg.keep_checkpoints,
                                     prune=node_rank() == 0, nnodes=nnodes())
    node_ranks = range(rank() - local_rank(), rank() - local_rank() + local_world_size())
    uploader = CheckpointUploader(uploads, checkpoints_dir, node_rank(), nnodes(), node_ranks,
                                  share_dcp_metadata=fsdp.enabled(cfg) and nnodes() > 1)
    samples = SampleGenerations(
        tokenizer,
        recipe.sample_prompts(tokenizer, eval_frame, data_cfg, cfg.sample_prompts) if has_eval else [],
        cfg.sample_max_new_tokens,
        zero3=sharding_stage(cfg, deepspeed_config) == 3,  # sharded weights (ZeRO-3, FSDP2): every rank generates
    )
    stopping = []
    if keep_best and cfg.early_stopping_patience > 0:
        from transformers import EarlyStoppingCallback

        # validation loss only (never the test split): stop after N evaluations without a better one
        stopping.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    with fsdp.trainer_on_cpu(cfg, on_cpu=not torch.cuda.is_available()):  # accelerate keeps FSDP2 on CPU too
        trainer = recipe.trainer(
            model=model, args=args, train_dataset=examples, eval_dataset=eval_examples, collator=collator,
            tokenizer=tokenizer, peft_config=peft_config, callbacks=[uploader, samples, *stopping, *callbacks],
        )
    fsdp.prepare_trainer(trainer)
    resume = restore(checkpoint_store, checkpoints_dir)
    if resume is not None and rank() == 0:
        print(f"[train] resuming from {resume.name} (checkpoint store)", flush=True)
    if resume is not None and uploads is not None and uploads.prune and not checkpoint_store.contains_complete(resume.name):
        uploads.submit(resume)  # carried into this attempt's store prefix, in case this attempt saves none
    sampler = ResourceSampler(cfg.profile_interval_s) if rank() == 0 else contextlib.nullcontext()
    start = time.perf_counter()
    try:
        with sampler:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException:
        if uploads is not None:  # a checkpoint saved just before the failure still reaches the store
            try:
                uploads.close(wait_for_nodes=False)
            except Exception as e:  # the training failure is the one to raise; this one is reported
                print(f"[train] checkpoint upload after the failure also failed: {type(e).__name__}: {e}", flush=True)
        raise
    runtime = time.perf_counter() - start
    summary = train_summary(recipe.label(cfg), trainer, result, runtime, recipe.trained_tokens(trainer), keep_best, resume,
                            samples.rows, sampler)
    return save_outputs(trainer, tokenizer, output_dir, cfg.weights == "full", base_model_dir, deepspeed_config, bf16,
                        summary, uploads)


def train_summary(method: str, trainer, result, runtime: float, trained_tokens: int, keep_best: bool, resume,
                  samples: list, sampler) -> TrainSummary:
    """What a finished run reports (train_summary.json, the task's outputs)."""
    state, args = trainer.state, trainer.args
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    ds_config = getattr(args, "hf_deepspeed_config", None)
    return TrainSummary(
        method=method,
        steps=int(result.global_step),
        world_size=int(args.world_size),
        first_loss=float(losses[0]) if losses else math.nan,
        final_loss=float(losses[-1]) if losses else math.nan,
        runtime_s=runtime,
        trained_tokens=trained_tokens,
        tokens_per_s=trained_tokens / runtime if runtime > 0 else 0.0,
        log_history=[{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in state.log_history],
        best_step=checkpoint_step(Path(state.best_model_checkpoint)) if keep_best and state.best_model_checkpoint else -1,
        best_eval_loss=float(state.best_metric) if keep_best and state.best_metric is not None else math.nan,
        resumed_from_step=checkpoint_step(resume) if resume is not None else 0,
        samples=samples,
        resource_profile=sampler.samples if isinstance(sampler, ResourceSampler) else [],
        deepspeed_config=json.loads(json.dumps(ds_config.config, default=str)) if ds_config is not None else {},
    )


def save_outputs(trainer, tokenizer, output_dir: Path, full: bool, base_model_dir, deepspeed_config, bf16: bool,
                 summary: TrainSummary, uploads) -> TrainOutputs | None:
    """Save the model (LoRA: the adapter, then merged into the base) and the summary.

    Every rank calls this (DeepSpeed ZeRO-3 gathers the weights in ``save_model``, FSDP2 in
    ``fsdp.save_full_model``); rank 0 writes, and gets the outputs. ``save_model`` is the last collective: while rank 0 merges
    (minutes for a large base) the others wait in ``wait_for_rank0``, on the store with its own
    long timeout, not in a barrier bounded by ``train.collective_timeout_s`` (which would time
    out, or have the NCCL watchdog abort the group, during a long merge). The checkpoint
    uploads close after that wait.
    """
    model_out = output_dir / "model"
    adapter_out = None if full else output_dir / "adapter"
    if getattr(trainer, "is_fsdp_enabled", False):  # all ranks: FSDP2 gathers whole weights (checkpoints: shards)
        fsdp.save_full_model(trainer, str(adapter_out or model_out))
    else:
        trainer.save_model(str(adapter_out or model_out))  # all ranks: DeepSpeed ZeRO-3 gathers here
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(adapter_out or model_out)
        if adapter_out is not None:
            if deepspeed_config:
                # rank 0 alone loads the base for merging: not under ZeRO-3's collective zero.Init
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
            merge_adapter(base_model_dir, adapter_out, model_out, bf16=bf16)
        (output_dir / "train_summary.json").write_text(json.dumps(asdict(summary), indent=2, default=str))
    wait_for_rank0("llm_finetune/outputs_saved", FINAL_WAIT_S)
    if uploads is not None:  # after the last collective: the other ranks need not wait for the store
        uploads.close()
    if rank() != 0:
        return None
    return TrainOutputs(model_out, adapter_out, summary)

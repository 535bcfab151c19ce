"""Supervised fine-tuning and continued pre-training on one or many processes.

Runs under torchrun / Flyte's Elastic plugin (RANK, WORLD_SIZE, MASTER_ADDR set) or as a
single process. The HF Trainer does the loop: DDP (gloo on CPU, NCCL on GPU), DeepSpeed
ZeRO through a JSON config, gradient accumulation with the loss normalised by the number
of trained tokens. LoRA adapters are merged into a freshly loaded fp32/bf16 base after
training, never into quantized weights.

Long runs survive preemption: checkpoints go to a checkpoint store every
``train.save_steps`` (see checkpoint.py) and a new attempt resumes from the latest one with
optimizer, scheduler, RNG and data position restored. With held-out data the validation
loss and sample generations are recorded at every evaluation and the best checkpoint by
validation loss is the one saved as the output.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import pandas as pd
import torch

from llm_finetune.collate import TokenCollator
from llm_finetune.config import DataConfig, TrainConfig, micro_batch
from llm_finetune.encoding import IGNORE_INDEX, encode_row, prompt_and_reference
from llm_finetune.checkpoint import checkpoint_step, complete_checkpoints, relocate
from llm_finetune.checkpoint_upload import BackgroundUploader
from llm_finetune.errors import ConfigError
from llm_finetune.fit import check_fits, count_parameters, deepspeed_offload
from llm_finetune.model import load_tokenizer
from llm_finetune.node_once import run_once_per_node
from llm_finetune.resources import ResourceSampler
from llm_finetune.trainer import CheckpointUploader, FineTuneTrainer, SampleGenerations, all_reduce_sum


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
        n = data_cfg.max_length or max(len(enc.input_ids), 1)  # 0 = auto: get_data fitted the rows already
        for start in range(0, len(enc.input_ids), n):
            ids, labels = enc.input_ids[start : start + n], enc.labels[start : start + n]
            if any(x != IGNORE_INDEX for x in labels):
                out.append({"input_ids": ids, "labels": labels})
    return out


def build_dataset(tokenizer, frame: pd.DataFrame, data_cfg: DataConfig):
    """The one place that turns canonical rows into training examples and their collator.

    Returns ``(examples, collator)``; swap this (e.g. for packing) and the rest of training
    is unchanged. Trained tokens are counted by the Trainer from the labels, so any
    collator that emits ``labels`` with -100 on untrained positions keeps the counts right.
    """
    examples = encode_frame(tokenizer, frame, data_cfg)
    packed = bool(data_cfg.packing and examples and "seq_lens" in examples[0])
    return examples, TokenCollator(tokenizer.pad_token_id, packed=packed)


def sample_prompts(tokenizer, frame: pd.DataFrame, data_cfg: DataConfig, n: int) -> list[tuple[str, str]]:
    """(prompt, reference) for the first ``n`` held-out rows; raw text rows give their first 32 tokens."""
    out = []
    for row in frame.head(n).to_dict(orient="records"):
        if row.get("messages"):
            out.append(prompt_and_reference(tokenizer, json.loads(row["messages"]), data_cfg.prompt_template))
        else:
            ids = tokenizer(row.get("text", ""), add_special_tokens=False)["input_ids"]
            out.append((tokenizer.decode(ids[:32]), tokenizer.decode(ids[32:64])))
    return out


# Ampere (8.0) and newer: native bf16, and the Triton kernels flex attention compiles to. Older cards
# (T4 7.5, V100 7.0) report bf16 as supported through emulation (slow) and cannot run flex attention.
NATIVE_BF16_CAPABILITY = (8, 0)


def gpu_capability() -> tuple[int, int] | None:
    """This process's GPU compute capability (major, minor); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(_local_rank()))


def attention_implementation(packed: bool) -> str:
    """Flex attention skips the masked blocks of packed rows on Ampere and newer GPUs; SDPA elsewhere.

    Never flex on CPU: it has no backward there, and torch's compiled CPU forward is wrong on AVX2 CPUs
    for key lengths of 8 mod 16 (packing.CPU_FLEX_LENGTH_MULTIPLE; bench/NOTES.md). Nor on GPUs older
    than compute capability 8.0, where its kernels do not run: there packed rows go through SDPA with
    the mask transformers builds from the restarted position ids (packing.py).
    """
    cap = gpu_capability()
    if packed and cap is not None and cap >= NATIVE_BF16_CAPABILITY:
        return "flex_attention"
    return "sdpa"


def _use_bf16(cfg: TrainConfig) -> bool:
    """bf16 mixed precision: asked for, or ``auto`` on a GPU with native bf16 (not ``is_bf16_supported``,
    which is also true where bf16 is only emulated)."""
    if cfg.precision == "bf16":
        return True
    if cfg.precision == "auto":
        cap = gpu_capability()
        return cap is not None and cap >= NATIVE_BF16_CAPABILITY
    return False


def _use_fp16(cfg: TrainConfig) -> bool:
    """fp16 mixed precision with loss scaling: asked for, or ``auto`` on a GPU without native bf16 (T4, V100)."""
    if cfg.precision == "fp16":
        return True
    if cfg.precision == "auto":
        cap = gpu_capability()
        return cap is not None and cap < NATIVE_BF16_CAPABILITY
    return False


def _check_hardware(cfg: TrainConfig) -> None:
    if cfg.method == "qlora" and not torch.cuda.is_available():
        raise ConfigError(["train.method: qlora needs a CUDA GPU, and this process sees none; use lora on CPU"])
    if cfg.precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise ConfigError([f"train.precision: {cfg.precision} needs a CUDA GPU, and this process sees none"])
    cap = gpu_capability()
    if cfg.precision == "bf16" and cap is not None and cap < NATIVE_BF16_CAPABILITY:
        name = torch.cuda.get_device_name(_local_rank())
        raise ConfigError([f"train.precision: bf16 on {name} (compute capability {cap[0]}.{cap[1]}) is emulated: slower "
                           f"than fp32 and no memory saved; use auto (fp16 with loss scaling on this GPU) or fp16"])


def _load_model(model_dir: Path, cfg: TrainConfig, bf16: bool, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # the frozen base of LoRA in the half precision training uses (PEFT keeps the adapters in fp32);
    # full fine-tuning keeps fp32 master weights under autocast
    half = torch.bfloat16 if bf16 else torch.float16 if _use_fp16(cfg) else None
    dtype = half if (half is not None and cfg.method != "full") else torch.float32
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if attn_implementation == "flex_attention":  # q, k, v of one dtype under autocast (attention.py)
        from llm_finetune.attention import register

        register()
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


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _nnodes() -> int:
    return max(1, _world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", _world_size())))


def _node_rank() -> int:
    return int(os.environ.get("GROUP_RANK", "0"))


def _init_distributed(timeout_s: int, deepspeed: bool = False) -> None:
    """Join the process group torchrun/Elastic described in the environment (gloo on CPU, NCCL on GPU).

    The timeout bounds every collective: when a rank dies or hangs, the others fail after
    ``train.collective_timeout_s`` instead of waiting forever, and the launcher (max_restarts=0)
    tears the whole group down so Flyte can retry the task.
    """
    import torch.distributed as dist

    if _world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(_local_rank())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if deepspeed and _world_size() > 1:
        # ZeRO-3 partitions weights while from_pretrained loads them (zero.Init), which reads the
        # world size from DeepSpeed's own comm layer: attach it to the group before loading
        import deepspeed as ds

        ds.init_distributed(dist_backend=dist.get_backend(), timeout=timedelta(seconds=timeout_s))


def _shared_output_dir(output_dir: str | Path | None) -> Path:
    """The training directory, the same path on every rank of a node.

    Given: used as is (a node's ranks must share it: DeepSpeed writes per-rank shards into
    it; other nodes have their own disks). None: a fresh temporary directory named by rank 0,
    with ``-node<k>`` on node k > 0 (each node saves its own checkpoints, even where two
    "nodes" share a disk).
    """
    import torch.distributed as dist

    if output_dir is not None:
        path = str(output_dir)
    else:
        path = tempfile.mkdtemp(prefix="train-") if _rank() == 0 else ""
        if dist.is_available() and dist.is_initialized():
            box = [path]
            dist.broadcast_object_list(box, src=0)
            path = box[0] + (f"-node{_node_rank()}" if _node_rank() else "")
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def _restore(store, checkpoints_dir: Path) -> Path | None:
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
    steps = [checkpoint_step(p) for p in complete_checkpoints(checkpoints_dir)] if _local_rank() == 0 else None
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


def _check_memory(model_dir: Path, cfg: TrainConfig, bf16: bool, deepspeed_config) -> None:
    """Refuse a run whose weights, gradients and optimizer states alone exceed the device (see fit.py)."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(_local_rank())
        available, device = props.total_memory, f"GPU {props.name}"
        offload = deepspeed_offload(deepspeed_config)
    else:
        import psutil

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        available, device = psutil.virtual_memory().total / local, f"this machine's RAM shared by {local} process(es)"
        offload = False  # offloading to CPU memory saves nothing when training in it
    n_params = count_parameters(model_dir)
    check_fits(n_params, cfg.method, bf16, _zero_stage(deepspeed_config), _world_size(), offload, available, device)


def _zero_stage(deepspeed_config: str | Path | None) -> int:
    if not deepspeed_config:
        return 0
    return int(json.loads(Path(deepspeed_config).read_text()).get("zero_optimization", {}).get("stage", 0))


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
    """Train and, on rank 0, write ``model/`` (and ``adapter/`` for LoRA) under ``output_dir``.

    ``output_dir`` None: a fresh temporary directory (rank 0's, shared with all ranks).
    ``checkpoint_store``: see checkpoint.py; when it holds a checkpoint, training resumes from it.
    ``eval_frame``: validation rows for validation loss, best-checkpoint choice, early stopping
    (``train.early_stopping_patience``) and sample generations; never the test rows.
    ``callbacks``: extra ``TrainerCallback``s (tests inject failures with them).
    Returns the outputs on global rank 0 and None on the other ranks.
    """
    from transformers import TrainingArguments, set_seed

    _check_hardware(cfg)
    base_model_dir = Path(base_model_dir)
    _check_memory(base_model_dir, cfg, _use_bf16(cfg) or _use_fp16(cfg), deepspeed_config)  # half-precision weights
    _init_distributed(cfg.collective_timeout_s, deepspeed=bool(deepspeed_config))
    output_dir = _shared_output_dir(output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(base_model_dir)
    examples, collator = build_dataset(tokenizer, train_frame, data_cfg)
    has_eval = eval_frame is not None and len(eval_frame) > 0 and cfg.eval_steps > 0
    eval_examples = None
    if has_eval:
        rows = eval_frame if cfg.eval_max_samples == 0 else eval_frame.head(cfg.eval_max_samples)
        eval_examples = build_dataset(tokenizer, rows, data_cfg)[0]
    keep_best = has_eval and cfg.save_steps > 0
    bf16 = _use_bf16(cfg)
    on_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
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
        fp16=_use_fp16(cfg),
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        use_cpu=on_cpu,
        ddp_backend=("gloo" if on_cpu else "nccl") if _world_size() > 1 else None,
        ddp_timeout=cfg.collective_timeout_s,
        dataloader_pin_memory=not on_cpu,
        remove_unused_columns=False,
        label_names=["labels"],
        deepspeed=_training_deepspeed_config(deepspeed_config, _nnodes() > 1),
        save_on_each_node=_nnodes() > 1,  # every node's disk holds a full checkpoint (its own shards)
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    model = _load_model(base_model_dir, cfg, bf16, attention_implementation(collator.packed))
    uploads = None
    if checkpoint_store is not None and _local_rank() == 0:  # one uploader per node, node 0 prunes
        uploads = BackgroundUploader(checkpoint_store, output_dir / "upload-staging", cfg.keep_checkpoints,
                                     prune=_node_rank() == 0, nnodes=_nnodes())
    node_ranks = range(_rank() - _local_rank(), _rank() - _local_rank() + int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    uploader = CheckpointUploader(uploads, checkpoints_dir, _node_rank(), _nnodes(), node_ranks)
    samples = SampleGenerations(
        tokenizer,
        sample_prompts(tokenizer, eval_frame, data_cfg, cfg.sample_prompts) if has_eval else [],
        cfg.sample_max_new_tokens,
        zero3=_zero_stage(deepspeed_config) == 3,
    )
    stopping = []
    if keep_best and cfg.early_stopping_patience > 0:
        from transformers import EarlyStoppingCallback

        # validation loss only (never the test split): stop after N evaluations without a better one
        stopping.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = FineTuneTrainer(
        model=model, args=args, train_dataset=examples, eval_dataset=eval_examples, data_collator=collator,
        callbacks=[uploader, samples, *stopping, *callbacks],
    )
    resume = _restore(checkpoint_store, checkpoints_dir)
    if resume is not None and _rank() == 0:
        print(f"[train] resuming from {resume.name} (checkpoint store)", flush=True)
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
            except Exception as e:  # the training failure is the one to raise; this one is reported
                print(f"[train] checkpoint upload after the failure also failed: {type(e).__name__}: {e}", flush=True)
        raise
    runtime = time.perf_counter() - start
    trained_tokens = int(all_reduce_sum(trainer.trained_tokens_local))

    summary = train_summary(cfg.method, trainer, result, runtime, trained_tokens, keep_best, resume, samples.rows, sampler)
    return save_outputs(trainer, tokenizer, output_dir, cfg.method == "full", base_model_dir, deepspeed_config, bf16,
                        summary, uploads)


def train_summary(method: str, trainer, result, runtime: float, trained_tokens: int, keep_best: bool, resume,
                  samples: list, sampler) -> TrainSummary:
    """What a finished run reports (train_summary.json, the task's outputs); shared by SFT and DPO."""
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
    """Save the model (LoRA: the adapter, then merged into the base) and the summary; shared by SFT and DPO.

    Every rank calls this (DeepSpeed ZeRO-3 gathers the weights in ``save_model``); rank 0
    writes, and gets the outputs. ``save_model`` is the last collective: while rank 0 merges
    (minutes for a large base) the others wait in ``wait_for_rank0``, on the store with its own
    long timeout, not in a barrier bounded by ``train.collective_timeout_s`` (which would time
    out, or have the NCCL watchdog abort the group, during a long merge). The checkpoint
    uploads close after that wait.
    """
    model_out = output_dir / "model"
    adapter_out = None if full else output_dir / "adapter"
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
    if _rank() != 0:
        return None
    return TrainOutputs(model_out, adapter_out, summary)


# How long the other ranks wait for rank 0 to merge and write the outputs. Generous on purpose: if
# rank 0 dies instead, the launcher ends the whole group (the store goes with it) long before this.
FINAL_WAIT_S = 6 * 3600


def wait_for_rank0(key: str, timeout_s: float) -> None:
    """Rank 0 marks ``key`` done in the process group's store; the other ranks wait for it there.

    Not a collective: no NCCL/gloo operation is outstanding, so neither the process group's
    timeout nor the NCCL watchdog applies, only ``timeout_s`` (the store wait's own).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        store.set(key, "done")
    else:
        store.wait([key], timedelta(seconds=timeout_s))


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



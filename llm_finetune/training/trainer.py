"""The HF Trainer subclass and callbacks that make a run safe to leave alone.

- ``FineTuneTrainer`` stops at the first non-finite loss (not after the run has burnt its
  budget on NaNs), counts trained tokens (labels != -100) whatever the collator, and
  logs trained tokens per second next to the loss. Its loss projects onto the vocabulary
  only the positions that carry a label, in chunks (label_loss.py), where that is exact.
- ``CheckpointUploader`` marks each checkpoint complete once every rank has finished writing
  it (DeepSpeed and FSDP2 shards are per rank) and hands it to a background upload (checkpoint_upload.py)
  on each node's local rank 0: no rank waits for the store inside a collective.
- ``SampleGenerations`` records greedy completions of a fixed set of held-out prompts at
  every evaluation, so a user can watch behaviour change across training.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from llm_finetune.training.checkpoint import node_part, write_node_marker
from llm_finetune.training.collate import model_inputs
from llm_finetune.encoding import IGNORE_INDEX
from llm_finetune.training.label_loss import label_only_loss
from llm_finetune.evaluation.generation import generation_budget, greedy


def all_reduce_sum(value: float) -> float:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item())
    return value


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class FineTuneTrainer(Trainer):
    label_only_loss = True  # False: the standard loss over full logits (the benchmark's reference)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_tokens_local = 0  # this rank, training micro-batches only (never eval)
        self.trained_tokens_total = 0  # all ranks, as of the last log
        self._last_log = (time.perf_counter(), 0)

    def train(self, *args, **kwargs):
        self._last_log = (time.perf_counter(), 0)  # throughput from here, not from model loading
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.trained_tokens_local += int((inputs["labels"] != IGNORE_INDEX).sum())
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = model_inputs(model, inputs)  # packed rows: examples kept apart (collate.py)
        loss = label_only_loss(model, inputs, num_items_in_batch) if self.label_only_loss else None
        if loss is None:  # the standard full-logits loss (this model's head cannot be chunked exactly)
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
        else:
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                # as Trainer.compute_loss: the token-normalised loss is rescaled because DDP averages gradients
                loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu)
            out = (loss, {"loss": loss.detach()}) if return_outputs else loss
        if model.training and not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.state.global_step + 1} (rank {self.args.process_index}); "
                "stopped at the first non-finite loss. Lower train.learning_rate, check the data for empty or "
                "corrupt rows, or use train.precision: bf16/fp32 instead of fp16"
            )
        return out

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: every rank gets here at the same step
            total = int(all_reduce_sum(self.trained_tokens_local))
            now = time.perf_counter()
            t0, n0 = self._last_log
            logs["trained_tokens"] = total
            logs["tokens_per_s"] = round((total - n0) / max(now - t0, 1e-9), 2)
            self._last_log, self.trained_tokens_total = (now, total), total
        super().log(logs, *args, **kwargs)


class CheckpointUploader(TrainerCallback):
    """After each checkpoint: wait for every rank, record this node's manifest, queue the upload (local rank 0).

    The barrier only waits for the ranks' own writes (seconds); the upload runs on
    ``uploader``'s thread while training goes on. ``uploader`` None: manifests only.
    ``share_dcp_metadata`` (FSDP2 on several nodes): rank 0's torch.distributed.checkpoint
    ``.metadata`` files are copied to every node's checkpoint first (fsdp.share_metadata).
    """

    def __init__(self, uploader, checkpoints_dir: Path, node: int = 0, nnodes: int = 1, ranks: range = range(1),
                 share_dcp_metadata: bool = False):
        self.uploader, self.checkpoints_dir = uploader, Path(checkpoints_dir)
        self.node, self.nnodes, self.ranks = node, nnodes, ranks  # ranks: this node's global ranks
        self.share_dcp_metadata = share_dcp_metadata

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank has written its optimizer/RNG shard
        ckpt = self.checkpoints_dir / f"checkpoint-{state.global_step}"
        if self.share_dcp_metadata:
            from llm_finetune.training.fsdp import share_metadata

            share_metadata(ckpt, args.local_process_index)
        if args.local_process_index == 0:
            part = node_part(ckpt, self.node, self.ranks)
            write_node_marker(ckpt, self.node, self.nnodes, part)
            if self.uploader is not None:
                self.uploader.submit(ckpt, part)


class SampleGenerations(TrainerCallback):
    """Greedy generations for fixed prompts at every evaluation; kept in ``self.rows`` on rank 0.

    Under ZeRO-3 and FSDP2 (``zero3``: the weights are sharded) every rank generates together
    (``synced_gpus``); otherwise rank 0 alone generates on its full copy.
    """

    def __init__(self, tokenizer, prompts: list[tuple[str, str]], max_new_tokens: int, zero3: bool):
        # train.sample_max_new_tokens: auto (0) fits the budget to the sampled rows' references
        budget = generation_budget(tokenizer, [ref for _, ref in prompts], max_new_tokens)
        self.tokenizer, self.prompts, self.max_new_tokens, self.zero3 = tokenizer, prompts, budget.max_new_tokens, zero3
        self.rows: list[dict] = []

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not self.prompts or (not self.zero3 and not state.is_world_process_zero):
            return
        was_training = model.training
        model.eval()
        try:
            texts = greedy(model, self.tokenizer, [p for p, _ in self.prompts], self.max_new_tokens,
                           batch_size=len(self.prompts), synced_gpus=self.zero3)
        finally:
            model.train(was_training)
        if state.is_world_process_zero:
            eval_loss = (metrics or {}).get("eval_loss", math.nan)
            for i, ((prompt, ref), text) in enumerate(zip(self.prompts, texts)):
                self.rows.append(
                    {"step": state.global_step, "prompt_id": i, "eval_loss": eval_loss, "prompt": prompt,
                     "reference": ref, "generation": text.strip()}
                )

"""FSDP2 (``train.sharding: fsdp2``): torch's ``fully_shard`` through the HF Trainer and accelerate.

The Trainer gets ``fsdp=True`` and an ``fsdp_config`` with ``version: 2`` (``fsdp_arguments``);
accelerate shards every decoder layer, the embeddings and the head with ``fully_shard``, so
parameters, gradients and optimizer states are split over all processes (as ZeRO-3).
``train.gradient_checkpointing`` becomes FSDP's own activation checkpointing for full weights
(``fsdp_config.activation_checkpointing``: the Trainer refuses both at once, and the Trainer's
own one would all-gather every layer a second time in the backward pass); LoRA keeps the
Trainer's (``fsdp_activation_checkpointing`` says why).

Checkpoints are sharded (``SHARDED_STATE_DICT``): torch.distributed.checkpoint writes
``pytorch_model_fsdp_0/`` and ``optimizer_0/``, each with one ``__<rank>_0.distcp`` file per
rank, per-rank files to the checkpoint store like ZeRO shards (checkpoint.py), and a
``.metadata`` index written by global rank 0 (node 0 uploads it; ``share_metadata`` copies it to
the other nodes' disks). A resumed run loads them back into the same number of processes. The final ``model/`` (or ``adapter/``) is gathered in full on rank 0
(``full_state_dict``), so it loads with ``from_pretrained``.

On CPU (gloo), accelerate drops the FSDP plugin without a word and trains with DDP: its state
only becomes FSDP on an accelerator. ``trainer_on_cpu`` restores it while the trainer is built,
so CPU runs (the tests, a local ``pyflyte run``) take the same path as GPU runs.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from llm_finetune.config import TrainConfig

STATE_DICT_TYPE = "SHARDED_STATE_DICT"  # checkpoints: one shard file per rank (torch.distributed.checkpoint)
METADATA = ".metadata"  # a DCP directory's index, written by global rank 0 only


def enabled(cfg: TrainConfig) -> bool:
    return cfg.sharding == "fsdp2"


def fsdp_arguments(cfg: TrainConfig) -> dict:
    """The ``TrainingArguments`` keys that turn FSDP2 on (none when ``train.sharding`` is not fsdp2)."""
    if not enabled(cfg):
        return {}
    fsdp_checkpointing = fsdp_activation_checkpointing(cfg)
    args = dict(
        fsdp=True,
        fsdp_config={
            "version": 2,
            "state_dict_type": STATE_DICT_TYPE,
            "reshard_after_forward": cfg.fsdp.reshard_after_forward,
            "cpu_offload": cfg.fsdp.cpu_offload,
            "activation_checkpointing": fsdp_checkpointing,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's decoder layers (_no_split_modules)
        },
    )
    if fsdp_checkpointing:  # FSDP's replaces the Trainer's (the Trainer refuses both at once)
        args.update(gradient_checkpointing=False, gradient_checkpointing_kwargs=None)
    return args


def fsdp_activation_checkpointing(cfg: TrainConfig) -> bool:
    """Whether ``train.gradient_checkpointing`` runs as FSDP's activation checkpointing (full weights) or as the
    Trainer's own, non-reentrant (LoRA).

    FSDP's wraps every decoder layer in a ``CheckpointWrapper``, which adds ``._checkpoint_wrapped_module`` to
    the module names; PEFT finds its adapter weights in a state dict by those module names while the state dict
    keys leave the wrapper out, so every LoRA checkpoint and the saved adapter came out empty (0 tensors: a
    resumed or best-checkpoint model silently lost its training). The Trainer's checkpointing keeps the names;
    it costs one more all-gather of each layer in the backward pass.
    """
    return cfg.gradient_checkpointing and cfg.weights == "full"


@contextlib.contextmanager
def trainer_on_cpu(cfg: TrainConfig, on_cpu: bool):
    """Build trainers inside this context: on CPU their accelerator keeps the FSDP plugin.

    accelerate sets its state to FSDP only for accelerator devices (``AcceleratorState``:
    MULTI_GPU, MULTI_XPU, ...), so with ``use_cpu`` the plugin is dropped and the Trainer
    silently trains with DDP. Here ``create_accelerator_and_postprocess`` (which every Trainer,
    TRL's included, calls in ``__init__``, before anything reads ``is_fsdp_enabled``) is followed
    by setting the state to FSDP with the plugin built from the same arguments. ``fully_shard``
    itself works on CPU with gloo. On a GPU, or without fsdp2, nothing is changed.
    """
    if not (enabled(cfg) and on_cpu):
        yield
        return
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess

    def create_accelerator_and_postprocess(self):
        original(self)
        if self.args.fsdp_plugin_args is None or self.is_fsdp_enabled:
            return
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if state.distributed_type != DistributedType.MULTI_CPU:
            return
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        # as AcceleratorState.__init__ does on a GPU: every later AcceleratorState() copies PartialState's
        # shared state over its own, and would turn a CPU run back into MULTI_CPU (a DDP-only view) mid-run
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True

    Trainer.create_accelerator_and_postprocess = create_accelerator_and_postprocess
    try:
        yield
    finally:
        Trainer.create_accelerator_and_postprocess = original


def prepare_trainer(trainer) -> None:
    """Work around the HF Trainer's sharded-checkpoint gap: under SHARDED_STATE_DICT ``save_model`` writes
    nothing, so ``_save_checkpoint`` finds no ``checkpoint-<step>`` directory yet when it records the best
    checkpoint (``os.path.exists``) and ``load_best_model_at_end`` silently keeps the last weights. The
    checkpoint directory is created first; the shards follow in ``_save_optimizer_and_scheduler``."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return
    original = trainer.save_model

    def save_model(output_dir=None, _internal_call=False):
        if _internal_call and output_dir is not None:
            os.makedirs(output_dir, exist_ok=True)
        return original(output_dir, _internal_call=_internal_call)

    trainer.save_model = save_model


def save_full_model(trainer, output_dir: str) -> None:
    """Every rank: gather the full weights (rank 0 gets them, on CPU) and save them as a ``from_pretrained``
    directory on rank 0 (an adapter for LoRA: PEFT keeps only its weights). Checkpoints stay sharded.

    What ``Trainer.save_model`` does with FULL_STATE_DICT, plus re-tying: the gathered copies of tied
    weights (embeddings and head) are separate tensors, which ``save_pretrained`` would store twice.
    """
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective
    if trainer.args.should_save:
        shared: dict[int, list[str]] = {}
        for name, param in trainer.model.named_parameters(remove_duplicate=False):
            shared.setdefault(id(param), []).append(name.replace("._checkpoint_wrapped_module", ""))
        for names in shared.values():
            for name in names[1:]:
                if names[0] in state_dict and name in state_dict:
                    state_dict[name] = state_dict[names[0]]
    trainer._save(output_dir, state_dict=state_dict)


def share_metadata(ckpt_dir: Path, local_rank: int) -> None:
    """Copy rank 0's DCP ``.metadata`` files into this node's checkpoint (a collective: every rank calls it).

    Each node saves checkpoints to its own disk, and torch.distributed.checkpoint writes a
    directory's ``.metadata`` on global rank 0 only; without it the ranks of the other nodes
    cannot load their own shards back (the best checkpoint at the end of training). The store
    gets node 0's copy; the other nodes' manifests list only their ranks' shards.
    """
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    box = [None]
    if dist.get_rank() == 0:
        box = [{p.relative_to(ckpt_dir).as_posix(): p.read_bytes() for p in sorted(ckpt_dir.rglob(METADATA))}]
    dist.broadcast_object_list(box, src=0)
    if local_rank != 0:
        return
    for rel, data in (box[0] or {}).items():
        target = ckpt_dir / rel
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)

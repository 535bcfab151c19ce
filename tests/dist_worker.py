"""A torchrun worker for the multi-process tests: trains the tiny model per a JSON spec.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py spec.json

spec: model_dir, out_dir, train (TrainConfig overrides), deepspeed (file name or null),
fault: {"rank": r, "step": s, "mode": "exit" | "hang"} to make one rank die or hang,
store: {"root": dir, "delay_s": t} a LocalCheckpointStore whose every save first sleeps t seconds
(a slow object store; the real store code runs after the sleep),
dpo: true to run DPO (llm_finetune/training/recipes/dpo.py) on the embedded preference pairs,
"""

import json
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from llm_finetune.training.checkpoint import LocalCheckpointStore
from llm_finetune.config import DataConfig, TrainConfig, deepspeed_config_path, from_dict
from llm_finetune.data.prepare import prepare
from llm_finetune.model import load_tokenizer
from llm_finetune.training.harness import train

ROOT = Path(__file__).resolve().parents[1]


class Fault(TrainerCallback):
    def __init__(self, rank: int, step: int, mode: str):
        self.rank, self.step, self.mode = rank, step, mode

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and int(os.environ["RANK"]) == self.rank:
            print(f"[fault] rank {self.rank} {self.mode}s at step {self.step}", flush=True)
            if self.mode == "exit":
                os._exit(3)  # no cleanup, no exception: like a killed process
            time.sleep(3600)  # hangs: the others must time out in their next collective


class ReportOptimizer(TrainerCallback):
    """Rank 0 prints the chain of optimizer classes after the first step (accelerate and DeepSpeed wrap theirs)."""

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == 1 and int(os.environ["RANK"]) == 0:
            chain = []
            while optimizer is not None and len(chain) < 5:
                chain.append(type(optimizer).__name__)
                optimizer = getattr(optimizer, "optimizer", None)
            print(f"[optimizer] {' > '.join(chain)}", flush=True)


class ReportSharding(TrainerCallback):
    """Rank 0 prints, after the first step, how many modules fully_shard wrapped (FSDP2: 0 under DDP, which
    accelerate falls back to on CPU without a word), how many layers FSDP's activation checkpointing wrapped,
    and whether the model runs transformers' own gradient checkpointing."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1 and int(os.environ["RANK"]) == 0:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
            from torch.distributed.fsdp import FSDPModule

            from llm_finetune.training.collate import unwrap

            modules = list(model.modules())
            print(f"[sharding] fsdp_modules={sum(isinstance(m, FSDPModule) for m in modules)} "
                  f"fsdp_checkpointed={sum(isinstance(m, CheckpointWrapper) for m in modules)} "
                  f"hf_checkpointing={bool(getattr(unwrap(model), 'is_gradient_checkpointing', False))}", flush=True)


class SlowStore(LocalCheckpointStore):
    def __init__(self, root: str, delay_s: float):
        super().__init__(root)
        self.delay_s = delay_s

    def save(self, ckpt_dir):
        print(f"[store] rank {os.environ['RANK']} uploading {Path(ckpt_dir).name} (takes {self.delay_s}s)", flush=True)
        time.sleep(self.delay_s)
        super().save(ckpt_dir)
        print(f"[store] rank {os.environ['RANK']} uploaded {Path(ckpt_dir).name}", flush=True)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("dpo"):
        return dpo(spec)
    cfg = from_dict(TrainConfig, spec["train"])
    prepared = prepare(DataConfig(), load_tokenizer(spec["model_dir"]))
    fault = [Fault(**spec["fault"])] if spec.get("fault") else []
    fault += [ReportOptimizer(), ReportSharding()]
    ds = deepspeed_config_path(spec.get("deepspeed") or "none", ROOT / "deepspeed_configs")
    store = SlowStore(**spec["store"]) if spec.get("store") else None
    out = train(spec["model_dir"], prepared.train, DataConfig(), cfg, spec["out_dir"], deepspeed_config=ds,
                eval_frame=prepared.validation, callbacks=fault, checkpoint_store=store)
    if out is not None:
        print("[summary] " + json.dumps({"steps": out.summary.steps, "first_loss": out.summary.first_loss}), flush=True)


def dpo(spec: dict) -> None:
    from llm_finetune.config import DPOTrainConfig, PreferenceDataConfig
    from llm_finetune.training.harness import train

    data = PreferenceDataConfig()
    prepared = prepare(data, load_tokenizer(spec["model_dir"]))
    ds = deepspeed_config_path(spec.get("deepspeed") or "none", ROOT / "deepspeed_configs")
    out = train(spec["model_dir"], prepared.train_tokens, data, from_dict(DPOTrainConfig, spec["train"]), spec["out_dir"],
                    deepspeed_config=ds, eval_frame=prepared.validation)
    if out is not None:
        print("[summary] " + json.dumps({"steps": out.summary.steps, "first_loss": out.summary.first_loss}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

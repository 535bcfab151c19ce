"""One torchrun worker of tests/test_multinode_zero_resume.py: the real ``train`` under ZeRO on one "node".

    python -m torch.distributed.run --nnodes 2 ... tests/two_node_zero_worker.py SPEC.json NODE_DIR

SPEC: model_dir, data (parquet), store (a LocalCheckpointStore root shared by the nodes, as
an object store is), deepspeed (config name), train (TrainConfig overrides), fail_at (every
rank raises after that optimizer step, or null). NODE_DIR is this node's own disk: its
training directory, and where global rank 0 writes ``result.json``.
"""

import json
import os
import sys
from pathlib import Path

import pandas as pd
import torch
from transformers import TrainerCallback

from llm_finetune.checkpoint import LocalCheckpointStore
from llm_finetune.config import DataConfig, TrainConfig, deepspeed_config_path, from_dict
from llm_finetune.train import train

ROOT = Path(__file__).resolve().parents[1]


class FailAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step} on rank {os.environ['RANK']}")


def main(spec_path: str, node_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    cfg = from_dict(TrainConfig, spec["train"])
    ds = deepspeed_config_path(spec["deepspeed"], ROOT / "deepspeed_configs")
    callbacks = [FailAt(spec["fail_at"])] if spec.get("fail_at") else []
    out = train(spec["model_dir"], pd.read_parquet(spec["data"]), DataConfig(), cfg, Path(node_dir) / "train",
                deepspeed_config=ds, checkpoint_store=LocalCheckpointStore(spec["store"]), callbacks=callbacks)
    if out is not None:
        s = out.summary
        losses = {h["step"]: h["loss"] for h in s.log_history if "loss" in h}
        (Path(node_dir) / "result.json").write_text(json.dumps(
            {"steps": s.steps, "resumed_from_step": s.resumed_from_step, "world_size": s.world_size,
             "losses": losses, "model_dir": str(out.model_dir)}))


if __name__ == "__main__":
    main(*sys.argv[1:])

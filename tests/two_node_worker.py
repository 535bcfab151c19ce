"""One torchrun worker of tests/test_multinode.py: the project's real ``train`` on a tiny model.

``transformers.Trainer.train`` is wrapped only to record, per rank, the environment the
rendezvous produced and a digest of the weights before and after the step; the training
itself is ``llm_finetune.training.harness.train`` unchanged.

    python -m torch.distributed.run ... tests/two_node_worker.py MODEL_DIR DATA.parquet OUT_DIR [SPEC.json]

SPEC (optional): {"train": TrainConfig overrides, "store": a LocalCheckpointStore root both nodes upload to,
"eval_rows": validation rows (the data's first ones) for the validation loss and the best checkpoint}.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import pandas as pd
import torch
import transformers

from llm_finetune.config import DataConfig, TrainConfig, from_dict
from llm_finetune.training.checkpoint import LocalCheckpointStore
from llm_finetune.training.harness import train

ENV_KEYS = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID")


def digest(model) -> str:
    """Of the whole weights: an FSDP2 shard (DTensor) is gathered first, a collective every rank runs in step."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        t = p.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        h.update(name.replace("._checkpoint_wrapped_module", "").encode())
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(model_dir: str, data: str, out: str, spec: str = "") -> None:
    out_dir = Path(out)
    spec = json.loads(Path(spec).read_text()) if spec else {}
    record = {"env": {k: os.environ.get(k) for k in ENV_KEYS}}
    original = transformers.Trainer.train

    def recording_train(self, *args, **kwargs):
        import torch.distributed as dist

        record["before"] = digest(self.model)
        result = original(self, *args, **kwargs)
        record.update(after=digest(self.model), steps=self.state.global_step,
                      backend=dist.get_backend(), dist_world_size=dist.get_world_size(), dist_rank=dist.get_rank())
        return result

    transformers.Trainer.train = recording_train
    train_keys = dict(weights="full", max_steps=1, per_device_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0,
                      logging_steps=1, nnodes=2, nproc_per_node=1)
    cfg = from_dict(TrainConfig, {**train_keys, **spec.get("train", {})})
    torch.set_num_threads(1)
    frame = pd.read_parquet(data)
    store = LocalCheckpointStore(spec["store"]) if spec.get("store") else None
    eval_frame = frame.head(spec["eval_rows"]) if spec.get("eval_rows") else None
    train(model_dir, frame, DataConfig(), cfg, out_dir / "train", eval_frame=eval_frame, checkpoint_store=store)
    (out_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The process group torchrun / Flyte's Elastic plugin describe in the environment, for every recipe.

RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and GROUP_RANK come from the launcher; a plain
``python`` process is rank 0 of 1. Collectives are bounded by ``train.collective_timeout_s``;
the final wait for rank 0 (which merges the adapter) is a store wait with its own long timeout.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def nnodes() -> int:
    return max(1, world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", world_size())))


def node_rank() -> int:
    return int(os.environ.get("GROUP_RANK", "0"))


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_distributed(timeout_s: int, deepspeed: bool = False) -> None:
    """Join the process group torchrun/Elastic described in the environment (gloo on CPU, NCCL on GPU).

    The timeout bounds every collective: when a rank dies or hangs, the others fail after
    ``train.collective_timeout_s`` instead of waiting forever, and the launcher (max_restarts=0)
    tears the whole group down so Flyte can retry the task.
    """
    import torch.distributed as dist

    if world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if deepspeed and world_size() > 1:
        # ZeRO-3 partitions weights while from_pretrained loads them (zero.Init), which reads the
        # world size from DeepSpeed's own comm layer: attach it to the group before loading
        import deepspeed as ds

        ds.init_distributed(dist_backend=dist.get_backend(), timeout=timedelta(seconds=timeout_s))


def shared_output_dir(output_dir: str | Path | None) -> Path:
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
        path = tempfile.mkdtemp(prefix="train-") if rank() == 0 else ""
        if is_distributed():
            box = [path]
            dist.broadcast_object_list(box, src=0)
            path = box[0] + (f"-node{node_rank()}" if node_rank() else "")
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


# How long the other ranks wait for rank 0 to merge and write the outputs. Generous on purpose: if
# rank 0 dies instead, the launcher ends the whole group (the store goes with it) long before this.
FINAL_WAIT_S = 6 * 3600


def wait_for_rank0(key: str, timeout_s: float) -> None:
    """Rank 0 marks ``key`` done in the process group's store; the other ranks wait for it there.

    Not a collective: no NCCL/gloo operation is outstanding, so neither the process group's
    timeout nor the NCCL watchdog applies, only ``timeout_s`` (the store wait's own).
    """
    import torch.distributed as dist

    if not is_distributed() or dist.get_world_size() == 1:
        return
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        store.set(key, "done")
    else:
        store.wait([key], timedelta(seconds=timeout_s))

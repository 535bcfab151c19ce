"""The base model's config and tokenizer for the checks before training, without its weights.

``check_outputs`` and ``get_data`` need the config, the tokenizer files and the parameter
count; ``FlyteDirectory.download()`` would pull every weight shard into a CPU pod (16 GB for
an 8B model) only to read a few JSON files. See llm_finetune/model_files.py.
``directory_bytes`` sizes a model from a listing, for the disk requests of the pods that read it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flytekit.core.context_manager import FlyteContextManager
from flytekit.types.directory import FlyteDirectory

from llm_finetune.training.fit import count_parameters
from llm_finetune.model_files import fetch_metadata


def model_metadata(directory: FlyteDirectory) -> tuple[Path, int]:
    """A local folder with the model's non-weight files, and its parameter count (0: unknown)."""
    source = getattr(directory, "_remote_source", None)  # set by flytekit when the input lives in the object store
    if not source:
        local = Path(directory.path)  # a local run: the folder is already here
        return local, count_parameters(local)
    fs = FlyteContextManager.current_context().file_access.get_filesystem_for_path(source)
    local = Path(tempfile.mkdtemp(prefix="model-metadata-"))
    return local, fetch_metadata(fs, source, local)


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")  # what llm_finetune.export.quantize.weights_mb counts


def weights_mb_listed(directory: FlyteDirectory) -> float:
    """``llm_finetune.export.quantize.weights_mb`` of ``directory`` from a listing of the store: no download, so no disk.

    Weighing a 12B model in fp32 by downloading it needed a 53Gi disk on a CPU pod, more than the
    runbook's default GKE pool offers (deploy/node-pools.yaml).
    """
    source = getattr(directory, "_remote_source", None) or str(directory.path)
    fs = FlyteContextManager.current_context().file_access.get_filesystem_for_path(source)
    root = source.rstrip("/")
    files = {f for pattern in WEIGHT_PATTERNS for f in fs.glob(f"{root}/{pattern}")}
    return round(sum(int(fs.size(f)) for f in files) / 2**20, 2)


def directory_bytes(directory: FlyteDirectory) -> int | None:
    """Bytes of the files under ``directory``, from a listing of the store (no download); None if it cannot be listed.

    The ``train_model`` and ``assess`` dynamics size their pods' disk from it (llm_finetune/disk.py).
    """
    source = getattr(directory, "_remote_source", None)  # set by flytekit when the input lives in the object store
    try:
        if not source:
            return sum(f.stat().st_size for f in Path(directory.path).rglob("*") if f.is_file())
        return int(FlyteContextManager.current_context().file_access.get_filesystem_for_path(source).du(source))
    except Exception as e:  # unreadable listing: the caller leaves the disk request unset rather than guess
        print(f"[disk] cannot list {source or directory.path} to size the pod's disk: {type(e).__name__}: {e}", flush=True)
        return None

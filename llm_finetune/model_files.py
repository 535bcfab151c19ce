"""A model folder's small files (config, tokenizer, generation config) without its weights.

Checks that run before training (is the architecture exportable to GGUF? how long may a
sequence be on this hardware?) need the config, the tokenizer and the parameter count, not
tens of GB of weights. ``fetch_metadata`` copies every file that is not a weight file from
any fsspec filesystem (S3, GCS, a local folder) and counts parameters from the safetensors
headers alone: a header is 8 bytes of length and a JSON table of tensor shapes, read with
one ranged read per shard.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def safetensors_header(f) -> dict:
    """The JSON header of a safetensors file open in binary mode (reads the header bytes only)."""
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"safetensors header of {n} bytes: not a safetensors file")
    return json.loads(f.read(n))


def parameters_in(header: dict) -> int:
    """Elements of every tensor a safetensors header lists (tied weights are stored once)."""
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for d in entry["shape"]:
            n *= d
        total += n
    return total


def fetch_metadata(fs, root: str, local_dir: str | Path) -> int:
    """Copy the non-weight files under ``root`` on ``fs`` into ``local_dir``; the parameter count.

    Only ``*.safetensors`` shards are counted; a model stored only as ``*.bin`` counts 0 (callers
    treat 0 as unknown).
    """
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    base = fs._strip_protocol(root).rstrip("/")
    n_params = 0
    for path in sorted(fs.find(base)):
        rel = path[len(base):].lstrip("/")
        if not rel or any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden files (.cache/, .gitattributes) are not part of the model
        if rel.endswith(".safetensors"):
            with fs.open(path, "rb", cache_type="none") as f:  # no read-ahead past the header
                n_params += parameters_in(safetensors_header(f))
        elif not is_weight_file(rel):
            target = local_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(target))
    return n_params

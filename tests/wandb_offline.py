"""Read a W&B offline run back from its files, independently of the code that wrote it.

``run-<id>.wandb`` is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1,
version) then LevelDB-log blocks of 32 KiB holding length-prefixed chunks (FULL, or
FIRST/MIDDLE/LAST pieces) of serialized ``wandb_internal_pb2.Record`` protobufs.
wandb 0.31 has no Python reader of its own (its core is a Go binary), hence this one.
"""

import json
import struct
from pathlib import Path

BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"{path} is not a W&B run file"
    out, pos, pending = [], 7, b""
    while pos + CHUNK_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER:  # block trailer: padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0 and length == 0:
            pos += room
            continue
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        out.append(record)
    return out


def read_run(wandb_dir: Path, run_id: str) -> dict:
    """Everything the offline sessions of one run recorded: config, history rows, summary, tags, artifacts."""
    run = {"config": {}, "history": [], "summary": {}, "tags": set(), "artifacts": [], "name": "", "files": []}
    for file in sorted(Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        run["files"].append(file)
        for r in records(file):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run["name"] = r.run.display_name or run["name"]
                run["tags"].update(r.run.tags)
                for item in r.run.config.update:
                    run["config"][item.key] = json.loads(item.value_json)
            elif kind == "config":
                for item in r.config.update:
                    run["config"][item.key] = json.loads(item.value_json)
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                run["history"].append(row)
            elif kind == "summary":
                for item in r.summary.update:
                    run["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "artifact":
                run["artifacts"].append(r.artifact)
    return run

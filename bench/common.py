"""What every benchmark records next to its figures: device, versions, time, git commit."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def embedded_model_dir() -> Path:
    """The embedded model as safetensors, rebuilt from its GGUF once per machine ($BENCH_CACHE)."""
    from llm_finetune.config import EMBEDDED_MODEL
    from llm_finetune.model import materialize

    cache = Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "llm-finetune-bench"))
    model_dir = cache / "smollm2-135m"
    if not (model_dir / "config.json").is_file():
        materialize(EMBEDDED_MODEL, model_dir)
    return model_dir


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "flytekit", "pandas", "pyarrow", "tokenizers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "device": device_name(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch_threads": __import__("torch").get_num_threads(),
    }


def write_result(name: str, payload: dict, directory: Path | None = None) -> Path:
    directory = Path(directory or RESULTS)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({**environment(), **payload}, indent=2))
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)

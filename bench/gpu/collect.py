"""Turns what a GPU check brought back (``gpu-check.tgz``) into committed results and a table for the notes.

A lease is 15 minutes and ends with the session's attention on other things, so nothing about reading the
results should be improvised then:

    python -m bench.gpu.collect /work/.device/<files_at> [--results bench/results]

writes ``gpu_check-<device>.json`` (the device line with its driver, the versions, every step's exit code and
seconds, every benchmark file as it came back), on a GPU also ``cuda_peers.json`` (one row per system, side by
side, with MFU and the ratios against TRL's best and the padded Trainer from the same run), and prints the
rows as a Markdown table. A failed or skipped row or step is kept and shown as such: never dropped, never
filled in.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
ARCHIVE = "gpu-check.tgz"


def read_device(text: str) -> dict:
    """nvidia-smi's CSV (a header, then ``name, memory, driver``) and the versions line, or the dry run's line."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    device: dict = {"kind": "cpu", "name": "", "versions": ""}
    for i, line in enumerate(lines):
        if line.startswith("name,") and i + 1 < len(lines):  # nvidia-smi --format=csv: header, then one row per GPU
            name, memory, driver = (x.strip() for x in lines[i + 1].split(",")[:3])
            device.update(kind="cuda", name=name, memory=memory, driver=driver)
        elif line.startswith("dry run on CPU"):
            device["name"] = line
        elif line.startswith("torch "):
            device["versions"] = line
    return device


def slug(device: dict) -> str:
    """A file-name form of the device: ``nvidia-h200``; the dry run's is ``cpu-dry``."""
    if device["kind"] != "cuda":
        return "cpu-dry"
    return re.sub(r"[^a-z0-9]+", "-", device["name"].lower()).strip("-")


def unpack(src: Path, into: Path) -> Path:
    """The folder holding the check's files: ``src`` itself when already unpacked, else its archive unpacked."""
    archive = src / ARCHIVE if src.is_dir() else src
    if not archive.is_file():
        if (src / "steps.txt").is_file():
            return src
        raise SystemExit(f"{src}: no {ARCHIVE} and no steps.txt; point at the folder the device call's files came back to")
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def benchmarks(folder: Path) -> dict[str, dict]:
    """Every benchmark run's file (the ones with all its rows; the one-row files repeat them), by file name."""
    out = {}
    for f in sorted(folder.glob("train_speed-*.json")):
        data = json.loads(f.read_text())
        if "rows" in data:
            out[f.name] = data
    return out


def peer_rows(runs: dict[str, dict]) -> list[dict]:
    """One row per (model, method, system), failed ones with their error, ratios as the run computed them."""
    rows = []
    for name, run in runs.items():
        for r in run["rows"]:
            row = {"run": name, "model": r.get("model", run.get("model", "")), "method": r["method"], "system": r["path"]}
            if "error" in r:
                row["error"] = r["error"]
            else:
                row.update(trained_tokens_per_s=round(r["trained_tok_s"], 1), mfu=r.get("mfu"),
                           model_tflop_s=r.get("model_tflop_s"), peak_mem_gib=round(r["peak_mem_gib"], 2),
                           padding_share=r.get("padding_share"), attention=r.get("attention"),
                           x_trl_best=r.get("x_trl_best"), x_hf_padded=r.get("x_hf_padded"))
            if not run.get("complete", True):
                row["note"] = "the run did not finish (cut by its step's time limit)"
            rows.append(row)
    return rows


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    head = "| model | method | system | trained tok/s | MFU | peak GiB | x TRL best | x HF padded |\n|---|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['system']} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['method']} | {r['system']} | {r['trained_tokens_per_s']:,.0f} | "
                     f"{_fmt(r['mfu'], '.1%')} | {r['peak_mem_gib']:.1f} | {_fmt(r['x_trl_best'], '.2f')} | "
                     f"{_fmt(r['x_hf_padded'], '.2f')} |")
    return "\n".join(lines)


def collect(src: Path, results: Path) -> dict:
    """Writes the result files under ``results`` and returns what went into them."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = unpack(src, Path(tmp))
        device = read_device((folder / "device.txt").read_text() if (folder / "device.txt").is_file() else "")
        steps = (folder / "steps.txt").read_text().splitlines() if (folder / "steps.txt").is_file() else []
        runs = benchmarks(folder)
        logs = {f.name: f.read_text()[-3000:] for f in sorted(folder.glob("*.log"))}  # the tail of each step's log
    rows = peer_rows(runs)
    check = {"device": device, "steps": steps, "rows": rows, "benchmarks": runs, "log_tails": logs}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"gpu_check-{slug(device)}.json").write_text(json.dumps(check, indent=2) + "\n")
    if device["kind"] == "cuda":
        peers = {"device": device["name"], "memory": device.get("memory"), "driver": device.get("driver"),
                 "versions": device["versions"], "rows": rows}
        (results / "cuda_peers.json").write_text(json.dumps(peers, indent=2) + "\n")
    return check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="the folder the device call's files came back to (or gpu-check.tgz)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes (default bench/results)")
    a = ap.parse_args()
    check = collect(a.src, a.results)
    print(f"{check['device']['name']} ({check['device'].get('driver', '')}): {check['device']['versions']}")
    print("\n".join(check["steps"]))
    print(markdown(check["rows"]))
    print(f"wrote {a.results}/gpu_check-{slug(check['device'])}.json"
          + (f" and {a.results}/cuda_peers.json" if check["device"]["kind"] == "cuda" else ""))


if __name__ == "__main__":
    main()

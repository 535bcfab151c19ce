"""The GPU check (bench/gpu/check.sh) proven on CPU before a lease: its dry run takes the same steps
on a tiny Llama built from a config, as the GPU rows build theirs, and must return every row's figures.

A lease is 15 minutes, start-up included, so the script must work on its first call: the TRL row
once crashed on models built from a config (no tokenizer to load), and results were written once,
at the end, so one failing row lost them all.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here trains a model or starts a process (tests/tiers.py)

ROOT = Path(__file__).resolve().parents[1]
DEVICE_FILES_BACK = 8  # the device tool brings back at most 8 files from $OUT (its README, Limits)


def unpacked(out: Path, into: Path) -> Path:
    """What the device call brings back: at most 8 files, the logs and JSON packed in gpu-check.tgz."""
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= DEVICE_FILES_BACK, sorted(str(f.relative_to(out)) for f in files)
    with tarfile.open(out / "gpu-check.tgz") as tar:
        tar.extractall(into, filter="data")
    return into


@pytest.mark.slow
def test_the_dry_run_returns_every_row_of_the_benchmark_and_collects_the_gpu_tests(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(out), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "check.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert (out / "steps.txt").read_text() and "torch" in (out / "device.txt").read_text()  # also outside the archive
    run_out, out = out, unpacked(out, tmp_path / "back")
    expected = [("lora", "ours"), ("lora", "trl_best"), ("lora", "hf_padded"), ("full", "ours"), ("full", "trl_best")]
    for method, system in expected:  # one JSON per finished row
        r = json.loads((out / f"train_speed-cpu-tiny-{method}-{system}.json").read_text())
        assert "error" not in r, (method, system, r.get("error"), r.get("stderr_tail", "")[-2000:])
        assert r["model"].startswith("Llama tiny") and r["trained_tok_s"] > 0 and r["peak_mem_gib"] > 0
    lora = json.loads((out / "train_speed-cpu-tiny-lora.json").read_text())
    assert lora["complete"] and [r["path"] for r in lora["rows"]] == ["ours", "trl_best", "hf_padded"]
    assert lora["rows"][0]["x_trl_best"] > 0 and lora["rows"][0]["x_hf_padded"] > 0  # ratios from the same run
    peers = json.loads((out / "cpu_peers-tiny-lora.json").read_text())
    assert {r["system"] for r in peers["rows"]} == {"ours", "trl_best", "hf_padded"}
    steps = [line.split()[:2] for line in (out / "steps.txt").read_text().splitlines()]
    assert steps == [["test-gpu", "rc=0"], ["bench-lora", "rc=0"], ["bench-full", "rc=0"]]
    assert "collected" in (out / "test-gpu.log").read_text()

    # what the session does with the files that came back: results JSON and the table for the notes
    from bench.gpu.collect import collect, markdown

    check = collect(run_out, tmp_path / "results")
    assert [(r["method"], r["system"]) for r in check["rows"]] == [("full", "ours"), ("full", "trl_best"),
                                                                  ("lora", "ours"), ("lora", "trl_best"), ("lora", "hf_padded")]
    assert all("error" not in r and r["trained_tokens_per_s"] > 0 for r in check["rows"])
    written = json.loads((tmp_path / "results" / "gpu_check-cpu-dry.json").read_text())
    assert written["steps"] == (run_out / "steps.txt").read_text().splitlines() and "torch " in written["device"]["versions"]
    assert not (tmp_path / "results" / "cuda_peers.json").exists()  # a dry run is no GPU figure
    assert markdown(check["rows"]).count("| Llama tiny") == 5


def test_steps_past_the_budget_are_skipped_not_cut_off(tmp_path):
    """The device call has a hard limit: a step that no longer fits the budget is skipped and said so."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "20"}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "check.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    steps = (unpacked(out, tmp_path / "back") / "steps.txt").read_text().splitlines()
    assert all("skipped" in line and "of 20s" in line for line in steps), steps
    assert run.returncode == 0  # nothing ran, nothing failed


def test_a_failing_row_is_recorded_and_the_results_are_still_written(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.train_speed", "--device", "cpu", "--model", "tiny",
                          "--methods", "lora", "--systems", "ours,hf_padded", "--row-timeout", "1", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "2 of 2 rows failed" in run.stderr
    result = json.loads((tmp_path / "train_speed-cpu-tiny-lora.json").read_text())
    assert result["complete"] and [r["path"] for r in result["rows"]] == ["ours", "hf_padded"]
    assert all(r["error"] == "timed out after 1s" for r in result["rows"])


def test_collect_keeps_failed_and_cut_rows_and_reads_the_gpu_line(tmp_path):
    """On a GPU the device line is nvidia-smi's CSV; a failed row and a run cut by its time limit stay visible."""
    from bench.gpu.collect import collect, markdown

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "device.txt").write_text("name, memory.total [MiB], driver_version\nNVIDIA H200, 143771 MiB, 580.159.03\n"
                                    "torch 2.11.0+cu130 transformers 5.17.0 peft 0.21.2 trl 1.16.0\n")
    (raw / "steps.txt").write_text("flex-probe rc=0 9s (limit 45s)\nbench-lora rc=124 230s (limit 230s)\nbench-full skipped: 20s left of 480s\n")
    ok = {"method": "lora", "path": "ours", "model": "Llama 1.1B", "trained_tok_s": 41000.0, "mfu": 0.41,
          "model_tflop_s": 320.0, "peak_mem_gib": 30.0, "padding_share": 0.01, "attention": "flex_attention",
          "x_trl_best": 1.2}
    failed = {"method": "lora", "path": "trl_best", "error": "timed out after 75s", "stderr_tail": "..."}
    (raw / "train_speed-cuda-lora.json").write_text(json.dumps({"rows": [ok, failed], "complete": False}))
    (raw / "train_speed-cuda-lora-ours.json").write_text(json.dumps(ok))  # one-row copies are not counted twice
    back = tmp_path / "back"
    back.mkdir()
    with tarfile.open(back / "gpu-check.tgz", "w:gz") as tar:
        tar.add(raw, arcname=".")
    check = collect(back, tmp_path / "results")
    assert check["device"] == {"kind": "cuda", "name": "NVIDIA H200", "memory": "143771 MiB", "driver": "580.159.03",
                                    "versions": "torch 2.11.0+cu130 transformers 5.17.0 peft 0.21.2 trl 1.16.0"}
    assert [r["system"] for r in check["rows"]] == ["ours", "trl_best"]
    assert check["rows"][1]["error"] == "timed out after 75s" and all("did not finish" in r["note"] for r in check["rows"])
    peers = json.loads((tmp_path / "results" / "cuda_peers.json").read_text())
    assert peers["device"] == "NVIDIA H200" and peers["driver"] == "580.159.03" and len(peers["rows"]) == 2
    assert (tmp_path / "results" / "gpu_check-nvidia-h200.json").is_file()
    table = markdown(check["rows"])
    assert "| 41,000 | 41.0% |" in table and "failed: timed out after 75s" in table

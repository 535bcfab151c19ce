"""The user's entry points: pyflyte run with a YAML config, and offline packaging."""

import pytest
import subprocess
import sys
import tarfile
from pathlib import Path

pytestmark = pytest.mark.slow  # every test here trains a model or starts a process (tests/tiers.py)

ROOT = Path(__file__).resolve().parents[1]
PYFLYTE = str(Path(sys.executable).with_name("pyflyte"))


def run(*args, **kw):
    return subprocess.run([PYFLYTE, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_bad_config_value_fails_fast_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  method: qlora\nquantize:\n  bits: 3\n")
    p = run("run", "workflows/fine_tune.py", "fine_tune", "--config", str(cfg))
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "train.method: qlora is deprecated: write train.method: sft and train.weights: qlora" in out  # the old spelling
    assert "train.weights: qlora quantizes the base model to 4-bit" in out
    assert "quantize.bits: 3 is not one of 0, 4, 8" in out
    assert "de-quantizing GGUF" not in out  # the base model was never prepared


def test_unknown_config_key_is_rejected(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("train:\n  learning_rte: 0.1\n")
    p = run("run", "workflows/fine_tune.py", "fine_tune", "--config", str(cfg))
    assert p.returncode != 0
    assert "train.learning_rte: unknown key. Did you mean 'learning_rate'?" in p.stdout + p.stderr


def test_pyflyte_package_succeeds_offline(tmp_path):
    out = tmp_path / "flyte-package.tgz"
    p = run("--pkgs", "workflows", "package", "--output", str(out), "--force", "--image", "ghcr.io/example/default:v1")
    assert p.returncode == 0, p.stdout + p.stderr
    with tarfile.open(out) as tar:
        names = tar.getnames()
    for obj in ("validate_config", "prepare_base_model", "get_data", "train_elastic", "train_model",
                "evaluate_model", "quantize_model", "push_to_hub", "summarize", "workflows.fine_tune.fine_tune"):
        assert any(obj in n for n in names), (obj, names)

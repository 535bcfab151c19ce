"""make check-cluster: requests compared with the platform limits before registering or launching."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_finetune.config import FineTuneConfig, TrainConfig, load_config
from tasks.limits import check, platform_limits, quantity

ROOT = Path(__file__).resolve().parents[1]
VALUES = yaml.safe_load((ROOT / "deploy" / "flyte-binary-values.yaml").read_text())


def test_kubernetes_quantities():
    assert quantity("500m") == 0.5 and quantity("2") == 2 and quantity(8) == 8
    assert quantity("8Gi") == 8 * 1024**3 and quantity("1G") == 1e9 and quantity("200Mi") == 200 * 1024**2
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity("8 gigs")


def test_flyte_defaults_reject_what_the_pipeline_asks_for():
    """No task_resources in the values: flyteadmin's cpu 2 / memory 1Gi / gpu 1 apply."""
    limits, source = platform_limits({})
    assert limits == {"cpu": "2", "memory": "1Gi", "gpu": "1"} and "built-in defaults" in source
    problems = check(FineTuneConfig(), {})
    joined = "\n".join(problems)
    assert "task tasks.data.get_data: requests memory 8Gi, above the platform limit 1Gi" in joined
    assert "flyteadmin rejects the registration" in joined
    assert "train.memory: requests memory 8Gi" in joined and "propeller silently clamps it" in joined
    assert "Raise configuration.inline.task_resources.limits.memory" in joined


def test_the_shipped_helm_values_fit_every_shipped_config():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert check(load_config(path), VALUES) == [], path.name


def test_a_request_above_the_raised_limits_names_its_config_key():
    cfg = FineTuneConfig(train=TrainConfig(memory="2000Gi", cpu="8", gpus_per_node=16, nproc_per_node=16))
    problems = check(cfg, VALUES)
    assert any(p.startswith("train.memory: requests memory 2000Gi, above the platform limit 1400Gi") for p in problems)
    assert any(p.startswith("train.gpus_per_node: requests gpu 16, above the platform limit 8") for p in problems)
    assert not any(p.startswith("train.cpu") for p in problems)


def test_flyte_core_values_are_read_too():
    core = {"configmap": {"task_resource_defaults": {"task_resources": {"limits": {"cpu": 4, "memory": "16Gi"}}}}}
    limits, source = platform_limits(core)
    assert limits["memory"] == "16Gi" and limits["gpu"] == "1" and source.startswith("flyte-core")
    assert any("configmap.task_resource_defaults.task_resources.limits.gpu" in p
               for p in check(FineTuneConfig(train=TrainConfig(gpus_per_node=2, nproc_per_node=2)), core))


def test_make_check_cluster(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "tasks.limits", "--config", "configs/llama7b_alpaca_lora.yaml",
                         "--values", "deploy/flyte-binary-values.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "every request of configs/llama7b_alpaca_lora.yaml fits" in ok.stdout
    (tmp_path / "values.yaml").write_text("configuration: {inline: {}}\n")
    bad = subprocess.run([sys.executable, "-m", "tasks.limits", "--config", "configs/llama7b_alpaca_lora.yaml",
                          "--values", str(tmp_path / "values.yaml")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "train.gpus_per_node: requests gpu 8, above the platform limit 1" in bad.stderr

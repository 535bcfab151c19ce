"""make check-cluster: requests compared with the platform limits, and every pod a config creates scheduled
on the runbook's node pools (deploy/node-pools.yaml), before registering or launching."""

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_finetune.config import FineTuneConfig, TrainConfig, load_config
from deploy.limits import GIB, build_pod, check, misfits, node_pools, place, platform_limits, quantity, schedule

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


@pytest.mark.slow
def test_make_check_cluster(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "deploy.limits", "--config", "configs/llama7b_alpaca_lora.yaml",
                         "--values", "deploy/flyte-binary-values.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "every request of configs/llama7b_alpaca_lora.yaml fits" in ok.stdout
    assert re.search(r"train_elastic .*interruptible -> gke-a100-spot", ok.stdout), ok.stdout
    assert re.search(r"get_data .* -> gke-default", ok.stdout)
    (tmp_path / "values.yaml").write_text("configuration: {inline: {}}\n")
    bad = subprocess.run([sys.executable, "-m", "deploy.limits", "--config", "configs/llama7b_alpaca_lora.yaml",
                          "--values", str(tmp_path / "values.yaml")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "train.gpus_per_node: requests gpu 8, above the platform limit 1" in bad.stderr


# ---------------------------------------------------------------------------------------------
# Scheduling against the runbook's node pools (deploy/node-pools.yaml)
# ---------------------------------------------------------------------------------------------

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _doc_commands(section: str) -> list[list[str]]:
    """The shell commands of one '### GKE' / '### EKS' block of docs/deploy.md, continuation lines joined."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    body = doc.split(f"### {section}\n", 1)[1].split("\n### ", 1)[0]
    block = body.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _flags(argv: list[str]) -> dict:
    out, i = {}, 0
    while i < len(argv):
        if argv[i].startswith("--"):
            key, _, inline = argv[i][2:].partition("=")
            if inline:
                out[key] = inline
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out[key] = argv[i + 1]
                i += 1
            else:
                out[key] = True
        i += 1
    return out


def _doc_pools() -> dict[str, dict]:
    """Each pool docs/deploy.md creates: cloud, name, machine, boot disk, spot, GPUs, labels it sets, taints."""
    pools = {}
    for argv in _doc_commands("GKE"):
        if argv[:4] == ["gcloud", "container", "clusters", "create"]:
            f, name = _flags(argv), "default"
        elif argv[:4] == ["gcloud", "container", "node-pools", "create"]:
            f, name = _flags(argv), argv[4]
        else:
            continue
        acc = dict(kv.split("=", 1) for kv in f["accelerator"].split(",")) if "accelerator" in f else {}
        pools[f"gke-{name}"] = dict(
            cloud="gke", name=name, machine=f["machine-type"], boot_disk_gb=int(f.get("disk-size", 100)),
            spot="spot" in f, gpu=acc.get("type", ""), gpus=int(acc.get("count", 0)),
            labels=dict(kv.split("=", 1) for kv in f["node-labels"].split(",")) if "node-labels" in f else {},
            taints=f["node-taints"].split(",") if "node-taints" in f else [],
        )
        if acc:  # GKE labels GPU nodes with the accelerator type itself
            pools[f"gke-{name}"]["labels"]["cloud.google.com/gke-accelerator"] = acc["type"]
    for argv in _doc_commands("EKS"):
        if argv[:3] == ["eksctl", "create", "cluster"]:
            f, name = _flags(argv), "default"
        elif argv[:3] == ["eksctl", "create", "nodegroup"]:
            f = _flags(argv)
            name = f["name"]
        else:
            continue
        labels = dict(kv.split("=", 1) for kv in f["node-labels"].split(",")) if "node-labels" in f else {}
        pools[f"eks-{name}"] = dict(
            cloud="eks", name=name, machine=f["node-type"], boot_disk_gb=int(f.get("node-volume-size", 80)),
            spot="spot" in f, gpu=labels.get("k8s.amazonaws.com/accelerator", ""), labels=labels,
            taints=f["node-taints"].split(",") if "node-taints" in f else [],
        )
    return pools


def test_the_pool_file_and_the_runbook_commands_agree():
    """deploy/node-pools.yaml is the runbook's gcloud/eksctl commands, field by field: neither can drift."""
    doc, data = _doc_pools(), node_pools()
    assert set(doc) == set(data), f"only in docs/deploy.md: {set(doc) - set(data)}; only in the yaml: {set(data) - set(doc)}"
    for key, d in doc.items():
        p = data[key]
        for field in ("cloud", "name", "machine", "boot_disk_gb", "spot", "gpu"):
            assert p[field] == d[field], (key, field, p[field], d[field])
        if "gpus" in d:
            assert p["gpus"] == d["gpus"], key
        assert sorted(p["taints"]) == sorted(d["taints"]), key
        for label, value in d["labels"].items():
            assert str(p["labels"].get(label)) == value, (key, label)
        # what the yaml declares of ours (spot, accelerator) the command sets (or, on GKE, the cloud sets)
        assert (p["labels"].get("spot") == "true") == p["spot"], key
        assert bool(p["gpu"]) == bool(p["gpus"]) == ("nvidia.com/gpu=present:NoSchedule" in p["taints"]), key


def test_the_eks_autoscaler_node_templates_match_the_pools():
    """An empty EKS group scales up only if its ASG tags carry the labels and taints its pods need."""
    tags: dict[str, list[str]] = {}
    for argv in _doc_commands("Scaling GPU pools from zero"):
        if argv and argv[0] == "tag_asg" and len(argv) > 1:
            tags[argv[1]] = [a.replace("$T/", "") for a in argv[2:]]
    gpu_groups = {p["name"]: p for p in node_pools().values() if p["cloud"] == "eks" and p["gpu"]}
    assert set(tags) == set(gpu_groups), (sorted(tags), sorted(gpu_groups))
    for name, pool in gpu_groups.items():
        labels = dict(t.removeprefix("label/").split("=", 1) for t in tags[name] if t.startswith("label/"))
        taints = ["=".join(t.removeprefix("taint/").split("=", 1)) for t in tags[name] if t.startswith("taint/")]
        assert labels == {k: str(v) for k, v in pool["labels"].items() if k in ("spot", "k8s.amazonaws.com/accelerator")}, name
        assert sorted(taints) == sorted(pool["taints"]), name
    # and the groups and the cluster are created with the autoscaler's IAM policy and discovery tags
    eks = [argv for argv in _doc_commands("EKS") if argv[:3] in (["eksctl", "create", "cluster"], ["eksctl", "create", "nodegroup"])]
    assert eks and all("asg-access" in _flags(argv) for argv in eks)


def test_the_ingress_values_never_expose_flyte_without_sign_in_or_tls():
    values = yaml.safe_load((ROOT / "deploy" / "flyte-binary-ingress-auth.yaml").read_text())
    ingress, auth = values["ingress"], values["configuration"]["auth"]
    assert ingress["create"] and auth["enabled"] and auth["oidc"]["baseUrl"].startswith("https://")
    assert any(ingress["host"] in t["hosts"] for t in ingress["tls"])  # TLS for the host (gRPC needs HTTP/2)
    assert ingress["grpcAnnotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert f"https://{ingress['host']}" in auth["authorizedUris"]
    # secrets are passed with --set, never committed
    assert not any([auth["oidc"]["clientSecret"], auth["internal"]["clientSecret"], auth["internal"]["clientSecretHash"]])
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for key in ("oidc.clientSecret", "internal.clientSecret", "internal.clientSecretHash"):
        assert f"--set configuration.auth.{key}=$" in doc, key


def test_the_runbook_installs_flyte_against_the_database_it_creates():
    """flyte-binary's default database host is 127.0.0.1: the install must point it at the one created."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    db = doc.split("### The control-plane database\n", 1)[1].split("\n### ", 1)[0]
    assert "gcloud sql instances create" in db and "aws rds create-db-instance" in db
    assert db.count("DB_HOST=$(") == 2  # one per cloud
    install = re.sub(r"\\\n\s*", " ", doc).split("helm install flyte-backend", 1)[1].splitlines()[0]
    for flag in ("configuration.database.host=$DB_HOST", 'configuration.database.password="$DB_PASSWORD"'):
        assert flag in install, install


def test_propeller_pod_from_the_values():
    """A GPU pod with an accelerator, interruptible: resource toleration, device selector, spot selector + toleration."""
    pod = build_pod("t", {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": 1}, VALUES, accelerator="nvidia-l4", interruptible=True)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod.tolerations
    assert {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"} in pod.tolerations
    assert {"key": "cloud.google.com/gke-accelerator", "operator": "In", "values": ["nvidia-l4"]} in pod.selectors
    assert {"key": "spot", "operator": "In", "values": ["true"]} in pod.selectors
    pools = node_pools()
    assert place(pod, {n: p for n, p in pools.items() if p["cloud"] == "gke"}, VALUES)[0] == ["gke-l4-spot"]
    cpu = build_pod("c", {}, VALUES)  # no requests: flyteadmin's task_resources.defaults of the values
    assert cpu.requests == {"cpu": "1", "memory": "2Gi"} and not cpu.tolerations and not cpu.selectors
    assert [k for k, _ in misfits(cpu, pools["gke-l4"])] == ["taint:nvidia.com/gpu"]
    assert not misfits(cpu, pools["gke-default"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_pod_of_a_shipped_config_lands_on_a_pool(path):
    placed, problems, notes, cloud = schedule(load_config(path), VALUES)
    assert cloud == "gke"  # the values' gpu-device-node-label is GKE's
    assert problems == [], "\n".join(problems)
    assert notes == []  # every shipped config's base model has a known size
    names = [pod.task for pod, _ in placed]
    assert {"validate_config", "prepare_base_model", "get_data", "summarize"} <= set(names)
    assert "train_elastic" in names
    for pod, fits in placed:
        assert fits, pod.task


def test_the_gpu_configs_land_on_their_spot_pool_and_fall_back_on_demand():
    placed, problems, _, _ = schedule(load_config(ROOT / "configs" / "llama3_8b_qlora.yaml"), VALUES)
    where = {pod.task: fits for pod, fits in placed}
    assert where["train_elastic"] == ["gke-l4-spot"]
    assert where["train_elastic (last attempt, on-demand)"] == ["gke-l4"]
    assert where["evaluate_model (tuned)"] == ["gke-l4"] and where["get_data"] == ["gke-default"]


def test_eks_values_schedule_on_the_eks_pools():
    eks = copy.deepcopy(VALUES)
    eks["configuration"]["inline"]["plugins"]["k8s"]["gpu-device-node-label"] = "k8s.amazonaws.com/accelerator"
    placed, problems, _, cloud = schedule(load_config(ROOT / "configs" / "llama7b_alpaca_lora.yaml"), eks)
    assert cloud == "eks" and problems == []
    assert {pod.task: fits for pod, fits in placed}["train_elastic"] == ["eks-a100-spot"]
    # the GKE label on EKS pools: every GPU pod is refused, and the fix names the label to set
    _, problems, _, _ = schedule(load_config(ROOT / "configs" / "llama7b_alpaca_lora.yaml"), VALUES, cloud="eks")
    assert problems and "set it to k8s.amazonaws.com/accelerator" in problems[0]


def test_an_interruptible_cpu_training_pod_is_refused():
    """Only the GPU pools are spot: a CPU pod marked interruptible fits nothing."""
    cfg = FineTuneConfig(train=TrainConfig(interruptible=True))
    _, problems, _, _ = schedule(cfg, VALUES)
    assert len(problems) == 1
    assert problems[0].startswith("task train_elastic (2 CPU, 8Gi, 10Gi disk, interruptible) fits no gke pool")
    assert "requires node label spot In ['true']" in problems[0]
    assert "set train.interruptible: false" in problems[0]


def test_a_100gi_disk_on_the_cpu_pool_is_refused():
    size = int(92 * GIB / 3)  # LoRA: 3 copies + 8 GiB = 100Gi
    _, problems, _, _ = schedule(FineTuneConfig(), VALUES, model_bytes={"embedded://SmolLM2-135M-Instruct": size})
    train = [p for p in problems if p.startswith("task train_elastic ")]
    assert len(train) == 1 and "requests ephemeral-storage 100Gi, a node offers 44Gi" in train[0]
    assert "give gke-default a larger boot disk" in train[0]


def test_an_accelerator_no_pool_has_is_refused():
    cfg = FineTuneConfig(train=TrainConfig(gpus_per_node=1, nproc_per_node=1, accelerator="nvidia-h100-80gb",
                                           cpu="8", memory="48Gi", precision="bf16"))
    _, problems, _, _ = schedule(cfg, VALUES)
    train = [p for p in problems if p.startswith("task train_elastic ")]
    assert train and "requires node label cloud.google.com/gke-accelerator In ['nvidia-h100-80gb']" in train[0]
    assert "set train.accelerator to one the pools have (nvidia-l4, nvidia-tesla-a100)" in train[0]


def test_an_unknown_model_is_checked_without_its_disk_and_says_so():
    cfg = FineTuneConfig()
    cfg.model.base_model = "someone/unknown-model"
    placed, problems, notes, _ = schedule(cfg, VALUES)
    assert problems == [] and "no known size" in notes[0]
    assert "ephemeral-storage" not in {pod.task: pod for pod, _ in placed}["train_elastic"].requests

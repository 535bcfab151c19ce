"""Will the cluster accept what a run asks for? Checked before registering or launching.

Flyte 1.16 has platform task-resource limits that are tiny by default (flyteadmin's
built-ins, which flyte-binary uses unless its values set them: cpu 2, memory 1Gi, gpu 1;
``flyteadmin/pkg/runtime/task_resource_provider.go``). Two different things happen past them:

- a task whose *static* request exceeds a limit is rejected when it is registered
  (InvalidArgument "Requested ... is greater than current limit",
  ``flyteadmin/pkg/manager/impl/validation/task_validator.go``): ``make register`` fails;
- requests set at run time (``train_model`` and ``assess`` size their nodes from the config
  with ``with_overrides``) are not validated there: propeller clamps them to the limits
  (``ensureResourceRange`` in ``flyteplugins/.../flytek8s/container_helper.go``), so a
  training pod that asked for 400Gi silently gets 1Gi and dies of OOM an hour in.

``check`` compares every request (each registered task's static one, and the ones the run
config makes at run time) with the limits in the Helm values the platform was installed
with, and lists each excess with the config key or task and the Helm key to raise.

``schedule`` then builds every pod a run of the config creates, as propeller would from the same
values (default requests, resource tolerations, the accelerator node selector, the interruptible
selector and tolerations, and the on-demand last attempt of an interruptible task), and places
each on the node pools of deploy/node-pools.yaml (allocatable CPU, memory, ephemeral storage and
GPUs; node labels; NoSchedule taints): it names the pool each pod lands on, or the task, what does
not fit and the fix. Offline: capacities come from the pool file, model sizes from
``KNOWN_MODEL_BYTES``; DaemonSet overhead, node counts and quotas are not modelled.

    make check-cluster CONFIG=configs/llama7b_alpaca_lora.yaml VALUES=deploy/flyte-binary-values.yaml
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

FLYTEADMIN_DEFAULT_LIMITS = {"cpu": "2", "memory": "1Gi", "gpu": "1"}
HELM_KEYS = {  # where each chart keeps flyteadmin's task_resources section
    "flyte-binary": ("configuration", "inline", "task_resources", "limits"),
    "flyte-core": ("configmap", "task_resource_defaults", "task_resources", "limits"),
}
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def quantity(value) -> float:
    """A Kubernetes quantity ("500m", "2", "8Gi", "1G") as a number (cores, bytes or a count)."""
    m = _QUANTITY.match(str(value))
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 8Gi)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def platform_limits(values: dict) -> tuple[dict, str]:
    """(limits, where they came from) from a flyte-binary or flyte-core Helm values mapping."""
    for chart, keys in HELM_KEYS.items():
        node = values
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and node:
            limits = dict(FLYTEADMIN_DEFAULT_LIMITS)
            limits.update({k: str(v) for k, v in node.items()})
            return limits, f"{chart} values: {'.'.join(keys)}"
    return dict(FLYTEADMIN_DEFAULT_LIMITS), "flyteadmin built-in defaults (the values set no task_resources.limits)"


@dataclass
class Request:
    who: str  # the config key or the task that makes the request
    resource: str  # cpu | memory | gpu | ephemeralStorage (flyteadmin 1.16's keys in task_resources)
    value: str
    when: str  # "registration" (static) or "run time" (with_overrides)


def _static_requests() -> list[Request]:
    """Every registered task's own requests, as ``pyflyte register`` sends them."""
    from flytekit.core.base_task import PythonTask

    import workflows.data_refresh  # noqa: F401  (imports every task module the project registers)
    import workflows.fine_tune  # noqa: F401
    import workflows.schedules  # noqa: F401

    out = []
    seen = set()
    for name, module in sorted(sys.modules.items()):
        if not (name.startswith("tasks.") or name.startswith("workflows.")):
            continue
        for obj in vars(module).values():
            if isinstance(obj, PythonTask) and obj.name not in seen:
                seen.add(obj.name)
                res = getattr(obj, "resources", None)
                req = getattr(res, "requests", None)
                for r in ("cpu", "mem", "gpu", "ephemeral_storage"):
                    v = getattr(req, r, None) if req is not None else None
                    if v not in (None, "", 0):
                        key = {"mem": "memory", "ephemeral_storage": "ephemeralStorage"}.get(r, r)  # flyteadmin's limit names
                        out.append(Request(f"task {obj.name}", key, str(v), "registration"))
    return out


def _runtime_requests(config) -> list[Request]:
    from tasks.evaluate import eval_resources

    t = config.train
    out = [Request("train.cpu", "cpu", t.cpu, "run time"), Request("train.memory", "memory", t.memory, "run time")]
    if t.gpus_per_node:
        out.append(Request("train.gpus_per_node", "gpu", str(t.gpus_per_node), "run time"))
    ev = eval_resources(t)
    for r, key in (("cpu", "cpu"), ("mem", "memory"), ("gpu", "gpu")):
        v = getattr(ev, r, None)
        if v not in (None, "", 0):
            out.append(Request("evaluate/quantize pods (sized from train.gpus_per_node)", key, str(v), "run time"))
    return out


NODE_POOLS = Path(__file__).resolve().parents[1] / "deploy" / "node-pools.yaml"


def node_pools(path: Path = NODE_POOLS) -> dict[str, dict]:
    """The runbook's node pools and the ephemeral storage one node of each offers to pods (deploy/node-pools.yaml)."""
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))["pools"]


def smallest_disk(pools: dict[str, dict], gpu: str | None = "") -> tuple[str, float]:
    """(pool name, bytes) of the pool offering the least ephemeral storage among those a pod may land on:
    ``gpu=""`` CPU pods (the untainted pools), an accelerator name its GPU pools, ``None`` any pool."""
    fits = {n: quantity(p["ephemeral_storage"]) for n, p in pools.items() if gpu is None or p["gpu"] == gpu}
    name = min(fits, key=fits.get)
    return name, fits[name]


def check(config, values: dict) -> list[str]:
    """Each request above the platform limit, with the key to lower or the Helm key to raise."""
    limits, source = platform_limits(values)
    helm = "configuration.inline.task_resources.limits" if "flyte-core" not in source else "configmap.task_resource_defaults.task_resources.limits"
    problems = []
    for r in _static_requests() + _runtime_requests(config):
        limit = limits.get(r.resource)
        if limit is None:
            continue
        if quantity(r.value) > quantity(limit):
            effect = ("flyteadmin rejects the registration" if r.when == "registration"
                      else "propeller silently clamps it to the limit at run time")
            problems.append(
                f"{r.who}: requests {r.resource} {r.value}, above the platform limit {limit} ({source}); {effect}. "
                f"Raise {helm}.{r.resource} in the Helm values (docs/deploy.md, 'Platform limits') or lower the request."
            )
    return problems


# --------------------------------------------------------------------------------------------
# Scheduling: the pods a config creates, as propeller builds them from the values file, against
# the node pools of deploy/node-pools.yaml.
# --------------------------------------------------------------------------------------------

GIB = 2**30
GB = 10**9
# Size on the hub of each shipped config's base model (safetensors weights, as prepare_base_model
# downloads them); the run-time disk requests of training, evaluation and quantization follow it
# (llm_finetune/disk.py). train_model/assess list the real size in the store at run time; offline we
# can only look it up here. A model missing from this table leaves those disk requests unset, and
# the check says so.
KNOWN_MODEL_BYTES = {
    "embedded://SmolLM2-135M-Instruct": int(0.54 * GB),  # 135M parameters, materialised in fp32
    "huggyllama/llama-7b": int(13.5 * GB),
    "huggyllama/llama-13b": int(26.0 * GB),
    "meta-llama/Meta-Llama-3-8B-Instruct": int(16.1 * GB),
    "EleutherAI/pythia-12b": int(23.8 * GB),
}


def tuned_factor(train) -> int:
    """The tuned model's size in base-model sizes (the shipped models are stored in 16 bits): full fine-tuning
    loads and saves fp32 (2x); a LoRA/QLoRA merge is saved in bf16 with ``precision: bf16``, else
    possibly in fp32 (2x, llm_finetune/training/weights.py merge_adapter)."""
    return 2 if train.weights == "full" or train.precision != "bf16" else 1
PROPELLER_GPU_LABEL = "k8s.amazonaws.com/accelerator"  # propeller's default gpu-device-node-label
GPU = "nvidia.com/gpu"
CLOUD_OF_LABEL = {"cloud.google.com/gke-accelerator": "gke", "k8s.amazonaws.com/accelerator": "eks"}


def k8s_plugin_config(values: dict) -> dict:
    """The k8s plugin section (tolerations, interruptible selectors, GPU label) of flyte-binary or flyte-core values."""
    for keys in (("configuration", "inline", "plugins", "k8s"), ("configmap", "k8s", "plugins", "k8s")):
        node = values
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            return node
    return {}


def default_requests(values: dict) -> dict:
    """flyteadmin's task_resources.defaults: the requests of a task that sets none."""
    for keys in (("configuration", "inline", "task_resources", "defaults"),
                 ("configmap", "task_resource_defaults", "task_resources", "defaults")):
        node = values
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            return {k: str(v) for k, v in node.items()}
    return {}


@dataclass
class Pod:
    """One pod a run creates, as propeller submits it: requests, required node labels, tolerations."""

    task: str
    requests: dict  # cpu | memory | ephemeral-storage | nvidia.com/gpu -> quantity string
    interruptible: bool = False
    accelerator: str = ""
    selectors: list = None  # required node selector requirements: {key, operator, values}
    node_selector: dict = None
    tolerations: list = None
    keys: dict = None  # what sets each request / choice: the config key (or file) to change
    note: str = ""

    def describe(self) -> str:
        r = self.requests
        parts = [f"{r['cpu']} CPU" if "cpu" in r else "", r.get("memory", "")]
        if r.get(GPU):
            parts.append(f"{r[GPU]} GPU" + (f" {self.accelerator}" if self.accelerator else ""))
        if r.get("ephemeral-storage"):
            parts.append(f"{r['ephemeral-storage']} disk")
        if self.interruptible:
            parts.append("interruptible")
        return ", ".join(p for p in parts if p)


def build_pod(task: str, requests: dict, values: dict, *, accelerator: str = "", interruptible: bool = False,
              keys: dict | None = None, note: str = "") -> Pod:
    """The pod propeller would submit (flyteplugins flytek8s/pod_helper.go, 1.16): platform default requests
    for unset cpu/memory; default-tolerations; resource-tolerations for each extended resource requested;
    for a GPU pod with an accelerator a required ``gpu-device-node-label In [device]`` (ApplyGPUNodeSelectors);
    interruptible pods the interruptible tolerations, node selector and node selector requirement,
    the others non-interruptible-node-selector-requirement."""
    k8s = k8s_plugin_config(values)
    req = {k: str(v) for k, v in requests.items() if v not in (None, "", 0, "0")}
    for k, v in default_requests(values).items():
        name = {"ephemeralStorage": "ephemeral-storage"}.get(k, k)
        if name in ("cpu", "memory") and name not in req:
            req[name] = v
    tolerations = list(k8s.get("default-tolerations") or [])
    for resource, tols in (k8s.get("resource-tolerations") or {}).items():
        if req.get(resource):
            tolerations += list(tols or [])
    selectors = []
    node_selector = dict(k8s.get("default-node-selector") or {})
    if req.get(GPU) and accelerator:
        label = k8s.get("gpu-device-node-label", PROPELLER_GPU_LABEL)
        selectors.append({"key": label, "operator": "In", "values": [accelerator]})
        tolerations.append({"key": label, "operator": "Equal", "value": accelerator, "effect": "NoSchedule"})
    if interruptible:
        tolerations += list(k8s.get("interruptible-tolerations") or [])
        node_selector.update(k8s.get("interruptible-node-selector") or {})
        if k8s.get("interruptible-node-selector-requirement"):
            selectors.append(dict(k8s["interruptible-node-selector-requirement"]))
    elif k8s.get("non-interruptible-node-selector-requirement"):
        selectors.append(dict(k8s["non-interruptible-node-selector-requirement"]))
    return Pod(task, req, interruptible, accelerator if req.get(GPU) else "", selectors, node_selector, tolerations,
               keys or {}, note)


def _taint(text: str) -> dict:
    """``key=value:Effect`` or ``key:Effect`` (gcloud/eksctl syntax) as a taint."""
    kv, _, effect = text.rpartition(":")
    key, _, value = kv.partition("=")
    return {"key": key, "value": value, "effect": effect}


def tolerates(tolerations: list, taint: dict) -> bool:
    """Kubernetes' ToleratesTaint: same effect (or none), and Exists on the key (or on all keys) or Equal key and value."""
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint["effect"]:
            continue
        op = t.get("operator", "Equal")
        if op == "Exists" and (not t.get("key") or t["key"] == taint["key"]):
            return True
        if op == "Equal" and t.get("key") == taint["key"] and str(t.get("value", "")) == taint["value"]:
            return True
    return False


def _matches(req: dict, labels: dict) -> bool:
    op, key, vals = req.get("operator", "In"), req["key"], [str(v) for v in req.get("values") or []]
    if op == "In":
        return key in labels and str(labels[key]) in vals
    if op == "NotIn":
        return key not in labels or str(labels[key]) not in vals
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    raise ValueError(f"node selector operator {op!r} is not modelled")


ALLOCATABLE = {"cpu": "cpu", "memory": "memory", "ephemeral-storage": "ephemeral_storage", GPU: "gpus"}


def misfits(pod: Pod, pool: dict) -> list[tuple[str, str]]:
    """Why ``pod`` cannot run on a node of ``pool``, as (kind, text) with kind resource | label | taint; [] = it fits."""
    out = []
    for resource, field in ALLOCATABLE.items():
        want = pod.requests.get(resource)
        if want and quantity(want) > quantity(pool.get(field, 0)):
            out.append(("resource:" + resource, f"requests {resource} {want}, a node offers {pool.get(field, 0)}"))
    labels = {k: str(v) for k, v in (pool.get("labels") or {}).items()}
    for k, v in (pod.node_selector or {}).items():
        if labels.get(k) != str(v):
            out.append(("label:" + k, f"node selector {k}={v}, the nodes have {k}={labels.get(k, '(none)')}"))
    for r in pod.selectors or []:
        if not _matches(r, labels):
            out.append(("label:" + r["key"], f"requires node label {r['key']} {r.get('operator', 'In')} {r.get('values', [])}, "
                                             f"the nodes have {r['key']}={labels.get(r['key'], '(none)')}"))
    for text in pool.get("taints") or []:
        taint = _taint(text)
        if taint["effect"] in ("NoSchedule", "NoExecute") and not tolerates(pod.tolerations or [], taint):
            out.append(("taint:" + taint["key"], f"does not tolerate the taint {text}"))
    return out


def _fix(kind: str, pod: Pod, pool_name: str, pool: dict, values: dict, pools: dict) -> str:
    keys = pod.keys or {}
    k8s = k8s_plugin_config(values)
    if kind.startswith("resource:"):
        resource = kind.split(":", 1)[1]
        where = keys.get(resource, f"the task's requests ({pod.task})")
        grow = "a larger boot disk" if resource == "ephemeral-storage" else "a larger machine type"
        return f"lower {where}, or give {pool_name} {grow} (deploy/node-pools.yaml and the docs/deploy.md command)"
    label = kind.split(":", 1)[1]
    spot_key = (k8s.get("interruptible-node-selector-requirement") or {}).get("key")
    if kind.startswith("label:") and pod.interruptible and (label == spot_key or label in (k8s.get("interruptible-node-selector") or {})):
        spot = sorted(n for n, p in pools.items() if p.get("spot"))
        return (f"the pod is interruptible ({keys.get('interruptible', 'interruptible=True')}) and only {', '.join(spot) or 'no pools'} "
                f"are spot: set {keys.get('interruptible', 'interruptible')}: false (auto: spot only with GPUs), or add a spot pool "
                f"that takes it to deploy/node-pools.yaml and docs/deploy.md")
    if kind.startswith("label:") and label == k8s.get("gpu-device-node-label", PROPELLER_GPU_LABEL):
        have = sorted({str(p["labels"][label]) for p in pools.values() if label in (p.get("labels") or {})})
        if not have:  # the values name another cloud's GPU label
            theirs = sorted({k for p in pools.values() for k in (p.get("labels") or {}) if k in CLOUD_OF_LABEL})
            return (f"no pool has the label {label} (plugins.k8s.gpu-device-node-label in the values): set it to "
                    f"{' or '.join(theirs) or 'the label these pools carry'} for these pools, or check the other cloud's pools (--cloud)")
        return (f"set {keys.get('accelerator', 'the accelerator')} to one the pools have ({', '.join(have) or 'none'}), "
                f"or create a pool labelled {label}={pod.accelerator} (deploy/node-pools.yaml, docs/deploy.md)")
    if kind.startswith("taint:"):
        return f"{pool_name} is tainted {label} (a pool for other pods)"
    return f"change the pod's node selection or the labels of {pool_name}"


def pools_for(values: dict, pools: dict, cloud: str | None = None) -> tuple[str, dict]:
    """(cloud, its pools): the values' gpu-device-node-label names the cloud they were written for, unless ``cloud`` is given."""
    if cloud is None:
        label = k8s_plugin_config(values).get("gpu-device-node-label", PROPELLER_GPU_LABEL)
        cloud = CLOUD_OF_LABEL.get(label, "any")
    chosen = {n: p for n, p in pools.items() if cloud == "any" or p.get("cloud") == cloud}
    return cloud, chosen


def place(pod: Pod, pools: dict, values: dict) -> tuple[list[str], str]:
    """(names of the pools that take ``pod``, "") or ([], why the nearest pools do not, with the fix).

    Nearest: the fewest untolerated taints (a tainted pool is meant for other pods), then the fewest reasons."""
    why = {n: misfits(pod, p) for n, p in pools.items()}
    fits = [n for n, reasons in why.items() if not reasons]
    if fits or not pools:
        return fits, "" if fits else "no pools declared for this cloud"

    def distance(n):
        return sum(k.startswith("taint:") for k, _ in why[n]), len(why[n])

    nearest = min(distance(n) for n in pools)
    best = [n for n in pools if distance(n) == nearest]
    fixes = []
    for n in best:
        for kind, _ in why[n]:
            f = _fix(kind, pod, n, pools[n], values, pools)
            if f not in fixes:
                fixes.append(f)
    text = "; ".join(f"{n}: " + ", ".join(t for _, t in why[n]) for n in best)
    return [], f"{text}. Fix: " + "; or ".join(fixes)


def _static_task_requests() -> dict[str, dict]:
    """Each registered task's own requests by its short name (cpu, memory, ephemeral-storage, nvidia.com/gpu)."""
    from flytekit.core.base_task import PythonTask

    import workflows.fine_tune  # noqa: F401

    out = {}
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("tasks."):
            continue
        for obj in vars(module).values():
            if isinstance(obj, PythonTask):
                req = getattr(getattr(obj, "resources", None), "requests", None)
                out[obj.name.rsplit(".", 1)[-1]] = {
                    "cpu": getattr(req, "cpu", None), "memory": getattr(req, "mem", None),
                    "ephemeral-storage": getattr(req, "ephemeral_storage", None), GPU: getattr(req, "gpu", None),
                    "_where": obj.name,
                }
    return out


def _res(r) -> dict:
    return {"cpu": r.cpu, "memory": r.mem, GPU: r.gpu, "ephemeral-storage": r.ephemeral_storage}


def config_pods(config, values: dict, model_bytes: dict | None = None) -> tuple[list[Pod], list[str]]:
    """Every pod a run of ``config`` creates (fine_tune's tasks, the dynamic nodes' children with the
    config's overrides), and notes on what could not be sized. ``model_bytes``: base model -> bytes
    (default KNOWN_MODEL_BYTES)."""
    from llm_finetune.config import is_interruptible
    from llm_finetune import sweep as sweeps
    from llm_finetune.config import quantize_variants
    from llm_finetune.disk import EVAL_COPIES, EVAL_QUANTIZED_COPIES, disk_gib, quantize_copies
    from tasks.evaluate import eval_resources
    from tasks.train import resources, training_disk

    sizes = KNOWN_MODEL_BYTES if model_bytes is None else model_bytes
    static = _static_task_requests()
    notes = []
    pods = []

    def fixed(name: str):
        req = {k: v for k, v in static[name].items() if not k.startswith("_")}
        where = static[name]["_where"].rsplit(".", 1)[0].replace(".", "/") + ".py"
        pods.append(build_pod(name, req, values, keys={k: f"{name}'s requests in {where}" for k in req}))

    base = config.model.base_model
    base_bytes = sizes.get(base)
    if base_bytes is None:
        notes.append(f"model.base_model {base!r} has no known size (deploy/limits.py KNOWN_MODEL_BYTES): the training, "
                     "evaluation and quantization pods are checked without their disk request, which train_model and "
                     "assess size from the model at run time")
    tuned_bytes = None if base_bytes is None else tuned_factor(config.train) * base_bytes

    def training(name: str, train, prefix: str, model: int | None, sweep=None):
        disk = training_disk(train, model)
        req = _res(resources(train, disk))
        keys = {"cpu": f"{prefix}.cpu", "memory": f"{prefix}.memory", GPU: f"{prefix}.gpus_per_node",
                "ephemeral-storage": f"the model's size x copies for {prefix}.weights (llm_finetune/disk.py)",
                "accelerator": f"{prefix}.accelerator", "interruptible": f"{prefix}.interruptible"}
        note = f"x {train.nnodes} pods (PyTorchJob workers)" if train.nnodes > 1 else ""
        if sweep is not None and sweep.enabled:  # a sweep's trials share this shape (hardware keys are not swept)
            at_once = min(sweep.concurrency, len(sweeps.expand(sweep)))
            note = f"{note}{'; ' if note else ''}x {at_once} trials at once (sweep.concurrency)"
        spot = is_interruptible(train)
        pods.append(build_pod(name, req, values, accelerator=train.accelerator, interruptible=spot, keys=keys, note=note))
        if spot:  # interruptible-failure-threshold: the last attempt(s) run on-demand
            pods.append(build_pod(f"{name} (last attempt, on-demand)", req, values, accelerator=train.accelerator,
                                  interruptible=False, keys=keys, note=note))

    for name in ("validate_config", "start_tracking", "prepare_base_model", "check_outputs", "get_data", "train_model"):
        fixed(name)
    t = config.train
    training("train_elastic", t, "train", base_bytes, config.sweep)
    if config.sweep.enabled:
        fixed("choose_trial")
    if config.preference.enabled:
        fixed("preference_stage")
        pods.append(build_pod("get_data (preference)", {k: v for k, v in static["get_data"].items() if not k.startswith("_")}, values))
        pods.append(build_pod("train_model (preference)", {k: v for k, v in static["train_model"].items() if not k.startswith("_")}, values))
        training("train_elastic (preference)", config.preference.train, "preference.train", tuned_bytes)
    fixed("assess")
    ev = eval_resources(t)
    ev_keys = {k: "train.gpus_per_node (eval_resources in tasks/evaluate.py)" for k in ("cpu", "memory", GPU)}
    ev_keys.update(accelerator="train.accelerator", **{"ephemeral-storage": "the model's size (llm_finetune/disk.py)"})
    final_bytes = tuned_bytes
    if config.preference.enabled and tuned_bytes is not None:  # the DPO stage's output, from the first stage's
        final_bytes = tuned_factor(config.preference.train) * tuned_bytes

    def assessing(name, model, copies, r=ev, keys=ev_keys):
        req = _res(r)
        req["ephemeral-storage"] = f"{disk_gib(model, copies)}Gi" if model is not None else None
        pods.append(build_pod(name, req, values, accelerator=t.accelerator if r.gpu else "", keys=keys))

    from flytekit import Resources

    assessing("evaluate_model (base)", base_bytes, EVAL_COPIES)
    assessing("evaluate_model (tuned)", final_bytes, EVAL_COPIES)
    assessing("quantize_model", final_bytes, quantize_copies(quantize_variants(config.quantize)))
    assessing("model_size_mb", None, 0, Resources(cpu="1", mem="1Gi"))  # weighs from the store's listing: no disk
    if config.quantize.evaluate:
        assessing("evaluate_quantized", final_bytes, EVAL_QUANTIZED_COPIES)
    if config.preference.enabled:  # the SFT task scored again after DPO (tasks/assess.py sft_task_scores)
        fixed("sft_task_scores")
        assessing("evaluate_model (SFT task, SFT)", tuned_bytes, EVAL_COPIES)
        assessing("evaluate_model (SFT task, SFT+DPO)", final_bytes, EVAL_COPIES)
    if config.hub.repo_id:
        fixed("push_to_hub")
    fixed("summarize")
    fixed("finish_tracking")
    return pods, notes


def schedule(config, values: dict, pools: dict | None = None, cloud: str | None = None,
             model_bytes: dict | None = None) -> tuple[list[tuple[Pod, list[str]]], list[str], list[str], str]:
    """(each pod with the pools that take it, problems naming task / resource / fix, notes, cloud)."""
    cloud, chosen = pools_for(values, node_pools() if pools is None else pools, cloud)
    pods, notes = config_pods(config, values, model_bytes)
    placed, problems = [], []
    for pod in pods:
        fits, why = place(pod, chosen, values)
        placed.append((pod, fits))
        if not fits:
            problems.append(f"task {pod.task} ({pod.describe()}) fits no {cloud} pool: {why}")
    return placed, problems, notes, cloud


def main(argv=None) -> int:
    import yaml

    from llm_finetune.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the run config (YAML) you will launch")
    p.add_argument("--values", required=True, help="the Helm values file the Flyte platform was installed with")
    p.add_argument("--pools", default=str(NODE_POOLS), help="the node pools (default deploy/node-pools.yaml)")
    p.add_argument("--cloud", choices=("gke", "eks", "any"), default=None,
                   help="whose pools to schedule on (default: the cloud the values' gpu-device-node-label names)")
    args = p.parse_args(argv)
    config = load_config(args.config)
    values = yaml.safe_load(Path(args.values).read_text(encoding="utf-8")) or {}
    problems = check(config, values)
    limits, source = platform_limits(values)
    placed, unplaced, notes, cloud = schedule(config, values, node_pools(Path(args.pools)), args.cloud)
    if problems:
        print(f"{len(problems)} request(s) the cluster would not grant (limits from {source}: {limits}):", file=sys.stderr)
        for line in problems:
            print(f"  - {line}", file=sys.stderr)
    else:
        print(f"every request of {args.config} fits the platform limits ({source}: {limits})")
    print(f"pods of {args.config} on the {cloud} pools of {args.pools}:")
    width = max(len(pod.task) for pod, _ in placed)
    for pod, fits in placed:
        where = " | ".join(fits) if fits else "NO POOL"
        print(f"  {pod.task:<{width}}  {pod.describe():<55} -> {where}" + (f"  ({pod.note})" if pod.note else ""))
    for n in notes:
        print(f"note: {n}")
    if unplaced:
        print(f"{len(unplaced)} pod(s) no pool takes (each would stay Pending until pod-pending-timeout):", file=sys.stderr)
        for line in unplaced:
            print(f"  - {line}", file=sys.stderr)
    return 1 if problems or unplaced else 0


if __name__ == "__main__":
    sys.exit(main())

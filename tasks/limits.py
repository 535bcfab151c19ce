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


def main(argv=None) -> int:
    import yaml

    from llm_finetune.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the run config (YAML) you will launch")
    p.add_argument("--values", required=True, help="the Helm values file the Flyte platform was installed with")
    args = p.parse_args(argv)
    config = load_config(args.config)
    values = yaml.safe_load(Path(args.values).read_text(encoding="utf-8")) or {}
    problems = check(config, values)
    limits, source = platform_limits(values)
    if problems:
        print(f"{len(problems)} request(s) the cluster would not grant (limits from {source}: {limits}):", file=sys.stderr)
        for line in problems:
            print(f"  - {line}", file=sys.stderr)
        return 1
    print(f"every request of {args.config} fits the platform limits ({source}: {limits})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

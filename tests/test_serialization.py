"""What the cluster will be given: the registered protobufs, decoded and checked offline.

``pyflyte package`` serializes every task, workflow and launch plan exactly as
``pyflyte register`` sends them to FlyteAdmin. The training scale is only decided when
the ``train_model`` dynamic runs, so that part is checked by running the dynamic's own
container command (``pyflyte-execute``, taken from its serialized template) for a given
config and decoding the ``DynamicJobSpec`` (futures.pb) it writes, the file propeller
would execute.
"""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from flyteidl.admin import launch_plan_pb2, task_pb2, workflow_pb2
from flyteidl.core import dynamic_job_pb2
from google.protobuf import json_format

from images.specs import cpu_image, gpu_image
from llm_finetune.config import DataConfig, FineTuneConfig, TrainConfig, is_interruptible, load_config, split_train
from tasks import common

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
_KINDS = {"1": task_pb2.TaskSpec, "2": workflow_pb2.WorkflowSpec, "3": launch_plan_pb2.LaunchPlan}


def _image(name: str) -> str:
    return name.rsplit(":", 1)[0]


CPU, GPU = _image(cpu_image.image_name()), _image(gpu_image.image_name())


def _package(out: Path, python_prefix: str = "") -> dict:
    """{(name, kind): decoded message} of everything ``pyflyte package`` writes for workflows/.

    With ``python_prefix``, pyflyte's own ``main`` runs after that code in one interpreter; without, the
    ``pyflyte`` command itself runs, as users run it."""
    pyflyte = [str(BIN / "pyflyte")] if not python_prefix else [
        sys.executable, "-c", python_prefix + "import sys\nfrom flytekit.clis.sdk_in_container.pyflyte import main\n"
        "sys.argv[0] = 'pyflyte'\nsys.exit(main())"]
    p = subprocess.run(
        [*pyflyte, "--pkgs", "workflows", "package", "--output", out / "pkg.tgz", "--force"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    decoded = {}
    with tarfile.open(out / "pkg.tgz") as tar:
        for member in tar.getmembers():
            m = re.fullmatch(r"\d+_(.+)_([123])\.pb", member.name)
            if m:
                msg = _KINDS[m.group(2)]()
                msg.ParseFromString(tar.extractfile(member).read())
                decoded[(m.group(1), m.group(2))] = msg
    return decoded


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> dict:
    """What ``pyflyte package`` (as ``pyflyte register`` would send them) writes for workflows/."""
    return _package(tmp_path_factory.mktemp("pkg"))


def _ordered(value):
    """flytekit lists a node's upstream node ids from a set: their order changes from one process to the next."""
    if isinstance(value, dict):
        return {k: sorted(v) if k == "upstreamNodeIds" else _ordered(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ordered(v) for v in value]
    return value


@pytest.mark.slow  # a second `pyflyte package`
def test_the_schema_cache_changes_nothing_that_is_registered(package, tmp_path):
    """tasks/schema_cache.py builds each dataclass's JSON schema once per process; flytekit without it is the
    reference: every task, workflow and launch plan must be the same message."""
    from mashumaro.jsonschema.builder import build_json_schema

    from llm_finetune.config import FineTuneConfig
    from tasks import schema_cache

    reference = _package(tmp_path, "import tasks.schema_cache\ntasks.schema_cache.uninstall()\n")
    assert reference.keys() == package.keys() and len(package) > 20
    for key, message in package.items():
        assert _ordered(json_format.MessageToDict(message)) == _ordered(json_format.MessageToDict(reference[key])), key
    # in this process too (the tests import the tasks): one schema object per type, equal to mashumaro's
    first = schema_cache._cached_build_json_schema(FineTuneConfig)
    assert schema_cache._cached_build_json_schema(FineTuneConfig) is first
    assert first.to_dict() == build_json_schema(FineTuneConfig).to_dict()
    import mashumaro.jsonschema
    assert mashumaro.jsonschema.build_json_schema is schema_cache._cached_build_json_schema


def _task(package, name: str) -> dict:
    return json_format.MessageToDict(package[(name, "1")].template)


def _requests(resources: dict) -> dict:
    return {r["name"]: r["value"] for r in resources.get("requests", [])}


# task -> (image, cache version or None, retries, requested resources)
EXPECTED = {
    "tasks.validate.validate_config": (CPU, None, 2, {}),
    "tasks.model.prepare_base_model": (CPU, common.CACHE_MODEL.version, 3, {"CPU": "2", "MEMORY": "8Gi", "EPHEMERAL_STORAGE": "40Gi"}),
    "tasks.data.get_data": (CPU, common.CACHE_DATA.version, 2, {"CPU": "2", "MEMORY": "8Gi"}),
    "tasks.train.train_model": (CPU, common.CACHE_TRAIN.version, 0, {}),
    "tasks.train.train_elastic": (GPU, common.CACHE_TRAIN.version, 2, {"CPU": "2", "MEMORY": "8Gi"}),
    "tasks.evaluate.evaluate_model": (CPU, common.CACHE_EVAL.version, 1, {"CPU": "2", "MEMORY": "8Gi"}),
    "tasks.quantize.quantize_model": (CPU, common.CACHE_QUANTIZE.version, 1, {"CPU": "2", "MEMORY": "8Gi"}),
    "tasks.hub.push_to_hub": (CPU, None, 3, {"CPU": "1", "MEMORY": "4Gi", "EPHEMERAL_STORAGE": "40Gi"}),
    "tasks.result.summarize": (CPU, None, 0, {}),
    "tasks.assess.assess": (CPU, None, 0, {}),
    "tasks.assess.sft_task_scores": (CPU, None, 0, {}),
    "tasks.evaluate.evaluate_quantized": (CPU, common.CACHE_EVAL.version, 1, {"CPU": "2", "MEMORY": "8Gi"}),
    "tasks.quantize.check_outputs": (CPU, common.CACHE_QUANTIZE.version, 0, {"CPU": "1", "MEMORY": "2Gi"}),
    "tasks.quantize.model_size_mb": (CPU, common.CACHE_QUANTIZE.version, 0, {"CPU": "1", "MEMORY": "1Gi"}),
    "tasks.preference_stage.preference_stage": (CPU, None, 0, {}),
    "tasks.tracking.start_tracking": (CPU, None, 0, {}),
    "tasks.tracking.finish_tracking": (CPU, None, 0, {}),
}
TRAINING_TASKS = ("tasks.train.train_elastic",)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.slow  # the module's package fixture runs `pyflyte package`
def test_task_image_cache_retries_resources(package, name):
    image, cache, retries, requests = EXPECTED[name]
    t = _task(package, name)
    assert t["type"] == "python-task"
    assert _image(t["container"]["image"]) == image
    assert t["container"]["image"] != image  # carries the spec's content tag
    assert t["metadata"].get("discoveryVersion") == cache
    assert bool(t["metadata"].get("discoverable")) == (cache is not None)
    assert t["metadata"]["retries"].get("retries", 0) == retries
    assert _requests(t["container"].get("resources", {})) == requests
    assert "GPU" not in _requests(t["container"].get("resources", {}))  # GPUs come from the run's config


@pytest.mark.slow  # the module's package fixture runs `pyflyte package`
def test_no_task_is_registered_interruptible_and_training_has_shared_memory(package):
    """Spot or not is decided per config when train_model launches the training node (see the dynamic
    test below); registered as the default config (CPU) decides: not interruptible, as the runbook's only
    spot pools are GPU pools and an interruptible CPU pod would never schedule."""
    for name in EXPECTED:
        assert not _task(package, name)["metadata"].get("interruptible"), name
    for name in TRAINING_TASKS:
        assert _task(package, name)["extendedResources"]["sharedMemory"]["mountPath"] == "/dev/shm"


def _quantity(value: str) -> float:
    from deploy.limits import quantity

    return quantity(value)


@pytest.mark.slow  # the module's package fixture runs `pyflyte package`
def test_no_task_asks_for_more_disk_than_the_smallest_node_it_may_land_on_offers(package):
    """A pod whose ephemeral-storage request exceeds every node's allocatable stays Pending (until
    pod-pending-timeout). Registered tasks request no GPU, so they land on the untainted default pools;
    the smallest is the GKE default pool's 100 GB boot disk, about 44 GiB (deploy/node-pools.yaml).
    prepare_base_model used to ask 50Gi and push_to_hub 100Gi."""
    import yaml

    from deploy.limits import node_pools, smallest_disk

    pool, offered = smallest_disk(node_pools(), gpu="")
    assert pool == "gke-default" and offered == _quantity("44Gi")
    values = yaml.safe_load((ROOT / "deploy" / "flyte-binary-values.yaml").read_text())
    default = values["configuration"]["inline"]["task_resources"]["defaults"].get("ephemeralStorage")
    assert default is None or _quantity(default) <= offered  # a platform default is the request of tasks that set none
    tasks = [key[0] for key, msg in package.items() if key[1] == "1"]
    assert set(EXPECTED) <= set(tasks)
    for name in tasks:
        resources = json_format.MessageToDict(package[(name, "1")].template).get("container", {}).get("resources", {})
        disk = _requests(resources).get("EPHEMERAL_STORAGE")
        assert disk is None or _quantity(disk) <= offered, f"{name} requests {disk} of disk; a {pool} node offers {offered / 2**30:.0f}Gi"


@pytest.mark.slow  # the module's package fixture runs `pyflyte package`
def test_push_to_hub_runs_only_when_publishing_and_the_other_branch_has_no_pod(package):
    wf = json_format.MessageToDict(package[("workflows.fine_tune.fine_tune", "2")].template)
    (branch,) = [n for n in wf["nodes"] if "branchNode" in n]
    if_else = branch["branchNode"]["ifElse"]
    condition = if_else["case"]["condition"]["comparison"]
    assert condition["leftValue"]["var"].endswith("publish") and condition["rightValue"]["primitive"]["boolean"] is True
    assert if_else["case"]["thenNode"]["taskNode"]["referenceId"]["name"] == "tasks.hub.push_to_hub"
    other = if_else["elseNode"]["taskNode"]["referenceId"]["name"]
    echo = _task(package, other)
    assert echo["type"] == "echo" and "container" not in echo  # propeller's echo plugin: no pod
    summarize = next(n for n in wf["nodes"] if n.get("taskNode", {}).get("referenceId", {}).get("name") == "tasks.result.summarize")
    urls = next(b for b in summarize["inputs"] if b["var"] == "hub_urls")
    assert urls["binding"]["promise"]["nodeId"] == branch["id"]


@pytest.mark.slow  # the module's package fixture runs `pyflyte package`
def test_training_cache_key_ignores_the_tracked_run(package):
    """Every execution has a new MLflow / W&B run id; it must not make the cluster retrain."""
    for name in ("tasks.train.train_model", "tasks.train.train_elastic"):
        t = _task(package, name)
        assert set(t["metadata"]["cacheIgnoreInputVars"]) == {"train_ops", "tracking"}, name
        assert "tracking" in t["interface"]["inputs"]["variables"], name


@pytest.mark.slow  # the module's package fixture runs `pyflyte package`
def test_hf_secret_requests(package):
    """Publishing reads the token itself; downloads of gated models/datasets get it as HF_TOKEN."""
    hf_token_env = {"group": "huggingface", "key": "token", "mountRequirement": "ENV_VAR", "envVar": "HF_TOKEN"}
    want = {
        "tasks.hub.push_to_hub": [{"group": "huggingface", "key": "token"}],
        "tasks.model.prepare_base_model": [hf_token_env],
        "tasks.data.get_data": [hf_token_env],
        "tasks.validate.validate_config": [hf_token_env],  # resolves hub revisions of gated repos
    }
    wandb = {"group": "wandb", "key": "api_key"}  # tracking.backend: wandb (validated first, used by these)
    # train_model starts one child run per sweep trial; choose_trial closes them with their final losses
    for name in ("tasks.validate.validate_config", "tasks.tracking.start_tracking", "tasks.train.train_elastic",
                 "tasks.train.train_model", "tasks.sweep.choose_trial", "tasks.tracking.finish_tracking"):
        want[name] = [*want.get(name, []), wandb]
    for name in EXPECTED:
        secrets = _task(package, name).get("securityContext", {}).get("secrets", [])
        assert secrets == want.get(name, []), name


@pytest.mark.slow  # the module's package fixture runs `pyflyte package`
def test_launch_plans_schedules_and_default_config(package):
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine
    from flytekit.models.literals import Literal

    from workflows.schedules import fine_tune_nightly, fine_tune_weekly

    nightly = json_format.MessageToDict(package[("fine_tune_nightly", "3")].spec)
    weekly = json_format.MessageToDict(package[("fine_tune_weekly", "3")].spec)
    assert nightly["workflowId"]["name"] == weekly["workflowId"]["name"] == "workflows.fine_tune.fine_tune"
    assert nightly["entityMetadata"]["schedule"] == {"cronSchedule": {"schedule": "0 3 * * *"}}
    assert weekly["entityMetadata"]["schedule"] == {"rate": {"value": 7, "unit": "DAY"}}
    assert not fine_tune_nightly.should_auto_activate and not fine_tune_weekly.should_auto_activate
    # same URI, new content is a cache miss through the pinned data.revision (test_cache_keys), so
    # schedules keep the cache: an unchanged night costs no GPU time
    assert not nightly.get("overwriteCache") and not weekly.get("overwriteCache")
    default = package[("fine_tune_nightly", "3")].spec.default_inputs.parameters["config"].default
    cfg = TypeEngine.to_python_value(
        FlyteContextManager.current_context(), Literal.from_flyte_idl(default), FineTuneConfig
    )
    assert cfg == load_config(ROOT / "configs" / "retrain_nightly.yaml")


@pytest.mark.slow  # the module's package fixture runs `pyflyte package`
def test_data_refresh_waits_on_a_file_sensor_then_launches_fine_tune(package):
    sensor = _task(package, "wait_for_data")
    assert sensor["type"] == "sensor" and sensor["custom"]["sensor_name"] == "FileSensor"
    wf = json_format.MessageToDict(package[("workflows.data_refresh.data_refresh", "2")].template)
    nodes = {n["id"]: n for n in wf["nodes"]}
    by_entity = {
        (n.get("taskNode", {}).get("referenceId") or n.get("workflowNode", {}).get("launchplanRef", {})).get("name"): n
        for n in nodes.values() if n["id"] not in ("start-node", "end-node")
    }
    launch = by_entity["workflows.fine_tune.fine_tune"]
    assert "launchplanRef" in launch["workflowNode"]  # a separate execution, not a sub-workflow
    point = by_entity["workflows.data_refresh.point_config_at"]
    assert by_entity["wait_for_data"]["id"] in point["upstreamNodeIds"]
    assert point["id"] in launch["upstreamNodeIds"]


# --- the dynamic, compiled for a config -----------------------------------------------


def _compile_train_model(package, tmp_path, train: TrainConfig, sweep=None, raw: bool = False) -> dict:
    """Run ``train_model``'s serialized container command on inputs for ``train`` (and ``sweep``); decode futures.pb."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine
    from flytekit.types.directory import FlyteDirectory
    from flytekit.types.structured import StructuredDataset

    from tasks.train import train_model

    template = package[("tasks.train.train_model", "1")].template
    inputs = {
        "base_model": FlyteDirectory("s3://bucket/base-model"),
        "train_data": StructuredDataset(uri="s3://bucket/train-data"),
        "eval_data": StructuredDataset(uri="s3://bucket/heldout"),
        "data": DataConfig(),
        **dict(zip(("train", "train_ops"), split_train(train))),
        **({"sweep": sweep} if sweep is not None else {}),
    }
    lm = TypeEngine.dict_to_literal_map(FlyteContextManager.current_context(), inputs, train_model.python_interface.inputs)
    (tmp_path / "inputs.pb").write_bytes(lm.to_flyte_idl().SerializeToString())
    values = {
        "{{.input}}": str(tmp_path / "inputs.pb"),
        "{{.outputPrefix}}": str(tmp_path / "out"),
        "{{.rawOutputDataPrefix}}": "s3://bucket/raw",  # a remote prefix: this is not a local run
    }
    args = [values.get(a, a) for a in template.container.args]
    env = {**ENV, **{e.key: e.value for e in template.container.env}}
    p = subprocess.run([BIN / args[0], *args[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    spec = dynamic_job_pb2.DynamicJobSpec()
    assert (tmp_path / "out" / "futures.pb").is_file(), sorted(str(f) for f in (tmp_path / "out").rglob("*")) + [p.stderr[-3000:]]
    spec.ParseFromString((tmp_path / "out" / "futures.pb").read_bytes())
    return spec if raw else json_format.MessageToDict(spec)


MULTI_NODE = TrainConfig(
    nnodes=2, nproc_per_node=8, gpus_per_node=8, accelerator="nvidia-h100", cpu="48", memory="400Gi",
    retries=4, interruptible=False,
)
ONE_L4 = TrainConfig(nproc_per_node=1, gpus_per_node=1, accelerator="nvidia-l4", weights="qlora")  # interruptible: auto


@pytest.mark.parametrize("train", [MULTI_NODE, TrainConfig(), ONE_L4], ids=["2x8xH100", "default-1-node-cpu", "1xL4-auto-spot"])
@pytest.mark.slow  # the module's package fixture runs `pyflyte package`
def test_dynamic_compiles_the_configured_elastic_task(package, tmp_path, train):
    spec = _compile_train_model(package, tmp_path, train)
    (node,) = spec["nodes"]
    (task,) = spec["tasks"]
    assert node["taskNode"]["referenceId"]["name"] == task["id"]["name"] == "tasks.train.train_elastic"

    # scale: nnodes > 1 is a Kubeflow PyTorchJob with one worker replica per node; 1 node is a plain pod
    if train.nnodes > 1:
        assert task["type"] == "pytorch"
        assert task["custom"]["workerReplicas"]["replicas"] == train.nnodes
        elastic = task["custom"]["elasticConfig"]
        assert (elastic["minReplicas"], elastic["maxReplicas"]) == (train.nnodes, train.nnodes)
        assert elastic["nprocPerNode"] == train.nproc_per_node and elastic["rdzvBackend"] == "c10d"
    else:
        assert task["type"] == "python-task" and "custom" not in task

    # per-pod resources, accelerator, retries, interruptible: the config's, as node overrides
    want = {"CPU": train.cpu, "MEMORY": train.memory, **({"GPU": str(train.gpus_per_node)} if train.gpus_per_node else {})}
    res = node["taskNode"]["overrides"]["resources"]
    assert _requests(res) == want and {r["name"]: r["value"] for r in res["limits"]} == want
    accel = node["taskNode"]["overrides"].get("extendedResources", {}).get("gpuAccelerator", {}).get("device")
    assert accel == (train.accelerator or None)
    assert node["metadata"]["retries"].get("retries", 0) == train.retries
    # spot for GPU training (auto), on-demand for CPU training (no CPU spot pool) and where the config says false
    assert node["metadata"].get("interruptible", False) == is_interruptible(train) == (train is ONE_L4)
    assert task["extendedResources"]["sharedMemory"]["mountPath"] == "/dev/shm"
    # the pod recomputes the ImageSpec and must land on the image registration built; CPU training
    # runs on the CPU image (no multi-GB CUDA image pulled for nothing)
    assert task["container"]["image"] == _task(package, "tasks.train.train_elastic")["container"]["image"]
    want_image = "tasks.train.train_elastic" if train.gpus_per_node else "tasks.validate.validate_config"
    assert node["taskNode"]["overrides"]["containerImage"] == _task(package, want_image)["container"]["image"]

    # inside each pod the task is rebuilt from the container args with the same scale, so
    # torchrun's launch config matches the PyTorchJob (the default resolver would re-import
    # the module-level task, configured for 1 node and 2 processes)
    args = task["container"]["args"]
    resolver = args[args.index("--resolver") + 1]
    loader_args = args[args.index("--") + 1 :]
    from flytekit.tools.module_loader import load_object_from_module

    loaded = load_object_from_module(resolver).load_task(loader_args)
    assert (loaded.min_nodes, loaded.max_nodes) == (train.nnodes, train.nnodes)
    assert loaded.task_config.nproc_per_node == train.nproc_per_node
    assert loaded.task_type == task["type"]


@pytest.mark.slow  # the module's package fixture runs `pyflyte package`
@pytest.mark.parametrize("method", ["dpo", "kto", "orpo"])
def test_every_method_compiles_to_the_one_training_task(package, tmp_path, method):
    """No task per method: train.method travels in the config and the harness picks the recipe (methods.py)."""
    spec = _compile_train_model(package, tmp_path, TrainConfig(method=method))
    (node,) = spec["nodes"]
    (task,) = spec["tasks"]
    assert node["taskNode"]["referenceId"]["name"] == task["id"]["name"] == "tasks.train.train_elastic"
    assert task["container"]["image"] == _task(package, "tasks.train.train_elastic")["container"]["image"]
    args = task["container"]["args"]
    from flytekit.tools.module_loader import load_object_from_module

    loaded = load_object_from_module(args[args.index("--resolver") + 1]).load_task(args[args.index("--") + 1 :])
    assert loaded.name == "tasks.train.train_elastic"


@pytest.mark.slow  # the module's package fixture runs `pyflyte package`
def test_a_sweep_compiles_to_one_training_node_per_trial_in_lanes_and_a_chooser(package, tmp_path):
    """What propeller runs for a sweep: a train_elastic node per trial with the trial's train section and the
    config's resources, at most sweep.concurrency unblocked at once, and choose_trial fed by every trial."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine
    from flytekit.models.literals import Literal

    from llm_finetune.config import from_dict, sweep_trials

    cfg = from_dict(FineTuneConfig, {"train": {"cpu": "3", "memory": "9Gi"}, "sweep": {
        "train.learning_rate": [1e-4, 3e-4, 1e-3], "train.lora.r": [8, 16], "concurrency": 2}})
    spec = _compile_train_model(package, tmp_path, cfg.train, sweep=cfg.sweep, raw=True)
    trials = sweep_trials(cfg.sweep)
    by_id = {n.id: n for n in spec.nodes}
    train_nodes = [n for n in spec.nodes if n.task_node.reference_id.name == "tasks.train.train_elastic"]
    (chooser,) = [n for n in spec.nodes if n.task_node.reference_id.name == "tasks.sweep.choose_trial"]
    assert [n.metadata.name for n in train_nodes] == [f"trial-{i}" for i in range(len(trials))]
    ctx = FlyteContextManager.current_context()
    for node, settings in zip(train_nodes, trials):
        binding = next(b for b in node.inputs if b.var == "train").binding
        train = TypeEngine.to_python_value(ctx, Literal.from_flyte_idl(_literal(binding)), TrainConfig)
        assert (train.learning_rate, train.lora.r) == (settings["train.learning_rate"], settings["train.lora.r"])
        res = json_format.MessageToDict(node.task_node.overrides)["resources"]
        assert _requests(res) == {"CPU": "3", "MEMORY": "9Gi"}
    # lanes: trial i waits for trial i - 2; the first two start at once
    position = {n.id: i for i, n in enumerate(train_nodes)}
    for i, node in enumerate(train_nodes):
        waits = sorted(position[u] for u in node.upstream_node_ids if u in position)
        assert waits == ([i - 2] if i >= 2 else [])
    # choose_trial reads every trial's outputs; the dynamic's outputs are the chooser's
    fed_by = {b.promise.node_id for i in chooser.inputs for b in i.binding.collection.bindings if b.HasField("promise")}
    assert fed_by == {n.id for n in train_nodes}
    assert {o.binding.promise.node_id for o in spec.outputs} == {chooser.id}
    assert by_id[chooser.id].task_node.reference_id.name == "tasks.sweep.choose_trial"


def _literal(binding):
    """A binding holding a plain value, as a Literal protobuf."""
    from flyteidl.core import literals_pb2

    return literals_pb2.Literal(scalar=binding.scalar)


@pytest.mark.slow
def test_copy_all_bundle_ships_the_files_tasks_read_at_runtime():
    """``--copy all`` (what docs/deploy.md and ``make register`` use) ships data files;
    the default ``--copy auto`` ships only imported modules, so a remote run would miss
    deepspeed_configs/*.json and the embedded dataset."""
    from flytekit.constants import CopyFileDetection
    from flytekit.tools.ignore import DockerIgnore, FlyteIgnore, GitIgnore, IgnoreGroup, StandardIgnore
    from flytekit.tools.script_mode import ls_files

    ignore = IgnoreGroup(str(ROOT), [GitIgnore, DockerIgnore, StandardIgnore, FlyteIgnore])
    files, _ = ls_files(str(ROOT), CopyFileDetection.ALL, deref_symlinks=False, ignore_group=ignore)
    shipped = {Path(f).relative_to(ROOT).as_posix() for f in files}
    needed = {"deepspeed_configs/zero3.json", "deepspeed_configs/zero3_offload.json", "llm_finetune/data/iso_dates.jsonl",
              "tasks/elastic.py", "workflows/fine_tune.py", "images/specs.py"}
    assert needed <= shipped
    assert not any(f.startswith((".venv/", "runs/")) or f.endswith((".safetensors", ".gguf")) for f in shipped)
    import workflows.fine_tune  # noqa: F401  (what --copy auto sees loaded)

    auto, _ = ls_files(str(ROOT), CopyFileDetection.LOADED_MODULES)
    assert not {Path(f).relative_to(ROOT).as_posix() for f in auto} & {"deepspeed_configs/zero3.json"}

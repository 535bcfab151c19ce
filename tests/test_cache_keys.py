"""Cache keys that hit on an identical rerun and miss when what they name changes.

- The compiled workflow (what ``pyflyte package`` / ``register --dry-run`` serialize) binds
  no cached node through an attribute path: propeller would re-encode those values with
  random map order (flyteorg/flyte#6776) and the cache would miss at random.
- Operational train keys (cpu, memory, retries, timeouts, intervals) are kept out of the
  training cache key; keys that change the weights are in it. Keys are computed with
  flytekit's own cache-key function on the literals the production task receives.
- ``data.revision`` / ``model.revision`` pin sources to content: a local file, an object-store
  object (ETag) and a hub repo at ``main`` (commit sha, from the hub stand-in).
"""

import dataclasses
from collections import OrderedDict

import pytest
from flytekit import task, workflow
from flytekit.configuration import ImageConfig, SerializationSettings
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.local_cache import _calculate_cache_key
from flytekit.core.type_engine import TypeEngine
from flytekit.models.core.workflow import WorkflowTemplate
from flytekit.tools.translator import get_serializable
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

from llm_finetune.config import (
    OPERATIONAL_TRAIN_KEYS,
    DataConfig,
    FineTuneConfig,
    ModelConfig,
    TrainConfig,
    TrainOps,
    join_train,
)
from llm_finetune.errors import ConfigError, TransientError
from tasks.validate import sections
from tests.hub_standin import HubStandIn, Repo

SETTINGS = SerializationSettings(image_config=ImageConfig.auto_default_image())


def _compile(entity):
    """{name: serialized entity} for ``entity`` and everything it references, as registration sends them."""
    entities = OrderedDict()
    get_serializable(entities, SETTINGS, entity)
    return entities


def attribute_path_bindings_into_cached_nodes(entity) -> tuple[list[str], int]:
    """(offending ``node <- var via .path`` strings, number of cached nodes examined) in ``entity``'s template."""
    entities = _compile(entity)
    cached = {s.template.id.name for s in entities.values() if hasattr(s, "template") and getattr(s.template, "metadata", None)
              and getattr(s.template.metadata, "discoverable", False)}
    wf = next(s for k, s in entities.items() if getattr(k, "name", None) == entity.name and hasattr(s, "template")
              and isinstance(s.template, WorkflowTemplate))
    bad, examined = [], 0
    for node in wf.template.nodes:
        target = node.task_node.reference_id.name if node.task_node else None
        if target not in cached:
            continue
        examined += 1
        for b in node.inputs:
            for promise in _promises(b.binding):
                if promise.attr_path:
                    path = ".".join(str(a) for a in promise.attr_path)
                    bad.append(f"{target} <- {b.var} via {promise.node_id}.{promise.var}.{path}")
    return bad, examined


def _promises(binding):
    if binding.promise is not None:
        yield binding.promise
    for b in (binding.collection.bindings if binding.collection else []):
        yield from _promises(b)
    for b in (binding.map.bindings.values() if binding.map else []):
        yield from _promises(b)


def test_compiled_workflow_binds_no_cached_node_through_an_attribute_path():
    from workflows.fine_tune import fine_tune

    bad, examined = attribute_path_bindings_into_cached_nodes(fine_tune)
    assert examined >= 4  # prepare_base_model, check_outputs, get_data, train_model (at least)
    assert bad == []


def test_the_check_catches_attribute_access_on_a_dataclass_promise():
    """Control: the wiring this project had before (``cfg.model`` off a config output) is flagged."""
    from tasks.model import prepare_base_model

    @task
    def passthrough(config: FineTuneConfig) -> FineTuneConfig:
        return config

    @workflow
    def old_style(config: FineTuneConfig = FineTuneConfig()) -> FlyteDirectory:
        cfg = passthrough(config=config)
        return prepare_base_model(model=cfg.model)

    bad, examined = attribute_path_bindings_into_cached_nodes(old_style)
    assert examined == 1 and len(bad) == 1 and bad[0].startswith("tasks.model.prepare_base_model <- model via ")
    assert bad[0].endswith(".model")


# --- operational settings stay out of the training key ------------------------------------


def _train_key(train_task, cfg: FineTuneConfig, tracking=None) -> str:
    """flytekit's cache key of ``train_task`` for the literals the workflow would give it for ``cfg``."""
    s = sections(cfg)
    inputs = {
        "base_model": FlyteDirectory("s3://bucket/base"), "train_data": StructuredDataset(uri="s3://bucket/tokens"),
        "eval_data": StructuredDataset(uri="s3://bucket/heldout"), "data": s.data, "train": s.train, "train_ops": s.train_ops,
    }
    if tracking is not None:
        inputs["tracking"] = tracking
    ctx = FlyteContextManager.current_context()
    lm = TypeEngine.dict_to_literal_map(ctx, inputs, train_task.python_interface.inputs)
    md = train_task.metadata
    return _calculate_cache_key(train_task.name, md.cache_version, lm, md.cache_ignore_input_vars)


OPS_CHANGED = dict(cpu="48", memory="400Gi", retries=5, interruptible=False, collective_timeout_s=1800, logging_steps=1,
                   profile_interval_s=0.5, sample_prompts=0, sample_max_new_tokens=64, accelerator="nvidia-h100",
                   gradient_checkpointing=True)
WEIGHTS_CHANGED = [dict(learning_rate=2e-4), dict(max_steps=61), dict(seed=7), dict(nproc_per_node=1),
                   dict(weights="full"), dict(per_device_batch_size=8), dict(eval_max_samples=10),
                   dict(sharding="fsdp2")]  # sharding changes how the run executes and its float rounding: keyed


@pytest.mark.parametrize("task_name", ["train_elastic", "train_model"])
def test_operational_train_keys_leave_the_training_key_alone(task_name):
    import tasks.train

    train_task = getattr(tasks.train, task_name)
    assert train_task.metadata.cache_ignore_input_vars == ("train_ops", "tracking")
    base = FineTuneConfig()
    key = _train_key(train_task, base)
    assert _train_key(train_task, base) == key  # deterministic
    from llm_finetune.tracking import TrackedRun  # each execution's new MLflow / W&B run id leaves it alone too

    assert _train_key(train_task, base, TrackedRun("mlflow", "0f3e9a", "http://mlflow/#/runs/0f3e9a")) == key
    ops = dataclasses.replace(base, train=dataclasses.replace(base.train, **OPS_CHANGED))
    assert _train_key(train_task, ops) == key
    for change in WEIGHTS_CHANGED:
        changed = dataclasses.replace(base, train=dataclasses.replace(base.train, **change))
        assert _train_key(train_task, changed) != key, change
    lora = dataclasses.replace(base, train=dataclasses.replace(base.train, lora=dataclasses.replace(base.train.lora, r=8)))
    assert _train_key(train_task, lora) != key


def test_the_task_still_gets_the_operational_values():
    cfg = dataclasses.replace(FineTuneConfig(), train=dataclasses.replace(TrainConfig(), **OPS_CHANGED))
    s = sections(cfg)
    assert join_train(s.train, s.train_ops) == cfg.train
    assert s.train == dataclasses.replace(cfg.train, **{k: getattr(TrainConfig(), k) for k in OPERATIONAL_TRAIN_KEYS})


def test_train_ops_mirrors_the_operational_train_keys():
    ops = {f.name: f for f in dataclasses.fields(TrainOps)}
    assert tuple(ops) == OPERATIONAL_TRAIN_KEYS
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, f in ops.items():
        assert f.type == train[name].type and getattr(TrainOps(), name) == getattr(TrainConfig(), name), name


# --- sources pinned to content ---------------------------------------------------------------


def _data_key(cfg: FineTuneConfig) -> str:
    from tasks.data import get_data

    s = sections(cfg)
    ctx = FlyteContextManager.current_context()
    lm = TypeEngine.dict_to_literal_map(ctx, {"data": s.data, "base_model": FlyteDirectory("s3://b/m")},
                                        get_data.python_interface.inputs)
    return _calculate_cache_key(get_data.name, get_data.metadata.cache_version, lm, ())


def test_a_local_data_file_keys_by_content(tmp_path):
    import hashlib
    import os

    f = tmp_path / "train.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = FineTuneConfig(data=DataConfig(source=str(f)))
    first = sections(cfg).data.revision
    assert first == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
    key = _data_key(cfg)
    os.utime(f, (1, 1))  # touched, same bytes: still a hit
    assert _data_key(cfg) == key
    f.write_text('{"instruction": "a", "output": "c"}\n')  # same name, new content: a miss
    assert _data_key(cfg) != key
    with pytest.raises(ConfigError, match="data.source: file not found"):
        sections(FineTuneConfig(data=DataConfig(source=str(tmp_path / "missing.jsonl"))))


def test_an_object_store_prefix_keys_by_etag_without_downloading():
    """An S3-like store (fsspec memory filesystem that reports ETags, as s3fs does): same-size rewrite -> new key."""
    import hashlib

    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.registry import register_implementation

    reads = []

    class EtagStore(MemoryFileSystem):
        protocol = "etagstore"

        @classmethod
        def _strip_protocol(cls, path):
            return MemoryFileSystem._strip_protocol(path.removeprefix("etagstore://"))

        def _tagged(self, entry):  # S3's listing and HEAD both carry the ETag (s3fs passes it on)
            entry = dict(entry)
            if entry["type"] == "file":
                entry["ETag"] = hashlib.md5(self.store[entry["name"]].getvalue()).hexdigest()
            return entry

        def info(self, path, **kwargs):
            return self._tagged(super().info(path, **kwargs))

        def ls(self, path, detail=True, **kwargs):
            out = super().ls(path, detail=detail, **kwargs)
            return [self._tagged(e) for e in out] if detail else out

        def _open(self, path, mode="rb", **kwargs):
            if "r" in mode:
                reads.append(path)
            return super()._open(path, mode, **kwargs)

    register_implementation("etagstore", EtagStore, clobber=True)
    fs = EtagStore()
    fs.pipe({"/bucket/data/a.jsonl": b'{"text": "one"}\n', "/bucket/data/b.jsonl": b'{"text": "two"}\n'})
    cfg = FineTuneConfig(data=DataConfig(source="etagstore://bucket/data"))
    first = sections(cfg).data.revision
    assert first.startswith("etag:") and sections(cfg).data.revision == first
    fs.pipe({"/bucket/data/b.jsonl": b'{"text": "TWO"}\n'})  # same size, new bytes
    assert sections(cfg).data.revision != first
    assert reads == []  # fingerprinted from listing metadata, nothing downloaded


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as constants

    server = HubStandIn({}).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    yield server
    server.stop()


def test_a_hub_model_at_main_is_pinned_to_its_commit(hub):
    hub.repos["org/base"] = Repo("org/base", private=False, commits=[{"oid": "a" * 40, "title": "v1", "files": []}])
    cfg = FineTuneConfig(model=ModelConfig(base_model="org/base", revision="main"))
    assert sections(cfg).model.revision == "a" * 40
    hub.repos["org/base"].commits.append({"oid": "b" * 40, "title": "v2", "files": []})  # main moved
    assert sections(cfg).model.revision == "b" * 40
    n = len(hub.requests)
    pinned = FineTuneConfig(model=ModelConfig(base_model="org/base", revision="c" * 40))
    assert sections(pinned).model.revision == "c" * 40 and len(hub.requests) == n  # a commit is already pinned
    with pytest.raises(ConfigError, match="model.revision: no hub model 'org/nope'"):
        sections(FineTuneConfig(model=ModelConfig(base_model="org/nope")))


def test_a_hub_that_does_not_answer_is_a_transient_error(hub):
    hub.repos["org/base"] = Repo("org/base", private=False, commits=[{"oid": "a" * 40, "title": "v1", "files": []}])
    hub.fail_next("GET", "/api/models/org/base", status=503, times=50)
    with pytest.raises(TransientError, match="model.revision: the hub did not answer"):
        sections(FineTuneConfig(model=ModelConfig(base_model="org/base")))


def test_embedded_sources_are_pinned_to_their_packaged_files():
    s = sections(FineTuneConfig())
    assert s.model.revision.startswith("sha256:") and s.data.revision.startswith("sha256:")
    assert sections(FineTuneConfig()) == s

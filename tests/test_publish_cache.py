"""Publishing settings stay out of cached work: renaming the hub repo re-runs only push_to_hub.

The compiled workflow is checked for which cached nodes read the ``hub`` or whole-``config``
outputs of validate_config (none may), and the ``assess`` dynamic workflow (whose cached
children are built at run time from the whole config) is run twice in the local Flyte cache
with only ``hub.repo_id`` changed: the second run must be all cache hits, while push_to_hub
publishes to the new repo.
"""

import dataclasses

import pytest
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

from llm_finetune.config import DataConfig, EvalConfig, FineTuneConfig, HubConfig, QuantizeConfig
from tests.hub_standin import HubStandIn
from tests.test_cache_keys import _compile

SECRET = "hf_cacheTEST_token_0a1b2c"


def test_no_cached_node_of_the_workflow_reads_publishing_settings():
    from flytekit.models.core.workflow import WorkflowTemplate

    from workflows.fine_tune import fine_tune

    entities = _compile(fine_tune)
    cached = {s.template.id.name for s in entities.values() if hasattr(s, "template")
              and getattr(getattr(s.template, "metadata", None), "discoverable", False)}
    wf = next(s for k, s in entities.items() if getattr(k, "name", None) == fine_tune.name and isinstance(getattr(s, "template", None), WorkflowTemplate))
    validate = next(n.id for n in wf.template.nodes if n.task_node and n.task_node.reference_id.name.endswith("validate_config"))
    readers = {}
    for node in _with_branches(wf.template.nodes):  # push_to_hub sits in the `publish` branch
        name = node.task_node.reference_id.name if node.task_node else node.id
        for b in node.inputs:
            p = b.binding.promise
            if p is not None and p.node_id == validate and p.var in ("hub", "config"):
                readers.setdefault(name, set()).add(p.var)
    assert len(cached) >= 4
    assert not set(readers) & cached, readers  # only uncached nodes (assess, push_to_hub) see hub settings
    assert any(n.endswith("push_to_hub") for n in readers)


def _with_branches(nodes):
    """The nodes and, for a branch node, the nodes of each of its cases."""
    for node in nodes:
        yield node
        if node.branch_node:
            ie = node.branch_node.if_else
            inner = [ie.case.then_node, *(c.then_node for c in ie.other or []), ie.else_node]
            yield from _with_branches([n for n in inner if n is not None])


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("_FSEC_HUGGINGFACE_TOKEN", SECRET)
    server = HubStandIn({SECRET: ("alice", ["alice"])}).start()
    yield server
    server.stop()


@pytest.mark.slow
def test_changing_only_hub_repo_id_reruns_nothing_but_publishing(isolated_flyte, tokenizer, hub, monkeypatch, tmp_path):
    import flytekit.core.local_cache as local_cache

    from llm_finetune.data.prepare import prepare
    from tasks.assess import assess
    from tasks.hub import push_to_hub
    from tests.tiny import save_tiny_llama

    lookups = []
    real_get = local_cache.LocalTaskCache.get

    def counting_get(task_name, *args, **kwargs):
        out = real_get(task_name, *args, **kwargs)
        lookups.append((task_name.split(".")[-1], out is not None))
        return out

    monkeypatch.setattr(local_cache.LocalTaskCache, "get", staticmethod(counting_get))

    base = FlyteDirectory(str(save_tiny_llama(tmp_path / "base", tokenizer, seed=0)))
    tuned = FlyteDirectory(str(save_tiny_llama(tmp_path / "tuned", tokenizer, seed=1)))
    data = DataConfig()
    heldout = StructuredDataset(dataframe=prepare(data, tokenizer).test.head(2))
    cfg = FineTuneConfig(data=data, evaluate=EvalConfig(max_samples=2, max_new_tokens=2, batch_size=2),
                         quantize=QuantizeConfig(variants=["gguf_q8_0"]),
                         hub=HubConfig(repo_id="alice/first", endpoint=hub.url))

    def run(config):
        lookups.clear()
        a = assess(base_model=base, tuned_model=tuned, eval_data=heldout, config=config)
        urls = push_to_hub(config=config, model=tuned, adapter=None, quantized=a.quantized, base=a.base, tuned=a.tuned, variants=a.variants)
        return list(lookups), urls

    first, urls1 = run(cfg)
    assert {t for t, _ in first} >= {"evaluate_model", "quantize_model", "model_size_mb", "evaluate_quantized"}
    assert not any(hit for _, hit in first)  # a fresh cache: everything computed
    renamed = dataclasses.replace(cfg, hub=dataclasses.replace(cfg.hub, repo_id="alice/second"))
    second, urls2 = run(renamed)
    assert sorted(second) == sorted((t, True) for t, _ in first)  # the same cached tasks, every one a hit
    assert urls1 == [f"{hub.url}/alice/first", f"{hub.url}/alice/first-gguf-q8-0"]
    assert urls2 == [f"{hub.url}/alice/second", f"{hub.url}/alice/second-gguf-q8-0"]  # publishing did run again
    assert hub.repos["alice/second-gguf-q8-0"].files.keys() == hub.repos["alice/first-gguf-q8-0"].files.keys()

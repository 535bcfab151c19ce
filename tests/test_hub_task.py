"""The push_to_hub and summarize tasks, run locally against the hub stand-in: token from the Flyte Secret, never leaked."""

from pathlib import Path

import pandas as pd
import pytest
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

from llm_finetune.config import FineTuneConfig, from_dict
from llm_finetune.evaluation.evaluate import EvalMetrics
from tests.hub_standin import HubStandIn
from tests.test_hub import parse_table

SECRET = "hf_flyteSECRETvalue_5d9c2e"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("_FSEC_HUGGINGFACE_TOKEN", SECRET)  # how flytekit serves Secret(group="huggingface", key="token") locally
    monkeypatch.setenv("HF_TOKEN", "hf_env_token_must_not_be_used")
    monkeypatch.setenv("LLM_FINETUNE_DECK_DIR", str(tmp_path / "decks"))
    server = HubStandIn({SECRET: ("alice", ["alice"])}).start()
    yield server
    server.stop()


def _folder(path, files):
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return FlyteDirectory(str(path))


def _report(loss, em):
    table = pd.DataFrame({"prompt": ["5 March 2021"], "reference": ["2021-03-05"], "prediction": ["2021-03-05" if em else "March"], "correct": [bool(em)]})
    return EvalReport(metrics=EvalMetrics(rows=1, loss=loss, perplexity=2.0, exact_match=float(em), exact_match_rows=1), samples=StructuredDataset(dataframe=table))


from tasks.evaluate import EvalReport, VariantMetrics  # noqa: E402
from tasks.hub import push_to_hub  # noqa: E402
from tasks.quantize import QuantizedModel  # noqa: E402
from tasks.result import summarize  # noqa: E402


@pytest.mark.slow
def test_publishes_every_artifact_idempotently_without_leaking_the_token(hub, tmp_path, capfd):
    cfg = from_dict(FineTuneConfig, {"hub": {"repo_id": "alice/iso", "endpoint": hub.url}})
    model = _folder(tmp_path / "model", {"config.json": b"{}", "model.safetensors": b"w" * 4096})
    adapter = _folder(tmp_path / "adapter", {"adapter_config.json": b"{}", "adapter_model.safetensors": b"a" * 512})
    gguf = _folder(tmp_path / "gguf", {"iso-q8_0.gguf": b"GGUF" + b"q" * 1024})
    quantized = [QuantizedModel("gguf_q8_0", gguf, "iso-q8_0.gguf", 0.01)]
    base, tuned = _report(0.6, 0), _report(0.01, 1)
    variants = [VariantMetrics("gguf_q8_0", 0.01, EvalMetrics(rows=1, loss=0.02, perplexity=1.02, exact_match=1.0), 0.01, 0.01, 0.0, 1.0)]
    args = dict(config=cfg, model=model, adapter=adapter, quantized=quantized, base=base, tuned=tuned, variants=variants)

    urls = push_to_hub(**args)
    assert urls == [f"{hub.url}/alice/iso", f"{hub.url}/alice/iso-lora", f"{hub.url}/alice/iso-gguf-q8-0"]
    assert all(auth == f"Bearer {SECRET}" for m, _, auth in hub.requests if m != "PUT")  # the Flyte Secret, not HF_TOKEN
    card = hub.repos["alice/iso-gguf-q8-0"].files["README.md"].decode()
    assert "base_model_relation: quantized" in card and "license: apache-2.0" in card and "GGUF q8_0" in card
    assert "| loss | 0.6000 | 0.0100 | 0.0200 |" in card  # base, tuned and the variant side by side
    assert "iso-q8_0.gguf" in hub.repos["alice/iso-gguf-q8-0"].files
    header, rows = parse_table(hub.repos["alice/iso"].files["README.md"].decode())  # the merged model's card shows variants too
    assert header == ["metric", "base", "tuned", "gguf_q8_0"] and list(rows) == ["loss", "perplexity", "exact_match"]

    commits = {r: len(repo.commits) for r, repo in hub.repos.items()}
    assert push_to_hub(**args) == urls and {r: len(repo.commits) for r, repo in hub.repos.items()} == commits

    result = summarize(tuned_model=model, adapter=adapter, quantized=quantized, base=base, tuned=tuned, variants=variants,
                       tuned_mb=0.01, hub_urls=urls)
    printed = capfd.readouterr()
    decks = "".join(p.read_text() for p in (tmp_path / "decks").glob("*.html"))
    cards = "".join(f.decode("utf-8", "replace") for repo in hub.repos.values() for f in repo.files.values())
    assert "Generations side by side" in decks and "unchanged (no new commit)" in printed.out
    for text in (printed.out, printed.err, decks, cards, repr(result), repr(urls)):
        assert SECRET not in text


def test_downloaded_artifacts_leave_the_disk_one_at_a_time(tmp_path):
    """On a cluster each artifact is a download: pushed, then deleted, so the pod's 40Gi disk holds the
    largest one, not all of them (tasks/common.py MODEL_DISK). A local folder (a local run) is left alone."""
    from tasks.hub import fetched

    copy = _folder(tmp_path / "pod" / "model", {"model.safetensors": b"w" * 4096})
    downloaded = FlyteDirectory(copy.path)
    downloaded._remote_source = "s3://bucket/model"  # what flytekit sets on a task input that lives in the store
    with fetched(downloaded) as folder:
        assert (Path(folder) / "model.safetensors").is_file()
    assert not (tmp_path / "pod" / "model").exists()
    local = _folder(tmp_path / "mine", {"model.safetensors": b"w"})
    with fetched(local):
        pass
    assert (tmp_path / "mine" / "model.safetensors").is_file()


def test_nothing_to_publish_is_an_empty_list_without_a_pod():
    """hub.repo_id empty: the workflow's other branch, propeller's echo plugin (no pod); locally a call."""
    from tasks.hub import no_hub_urls

    assert no_hub_urls.task_type == "echo" and no_hub_urls.get_container(None) is None
    assert no_hub_urls(urls=[]) == []


def test_every_quantize_variant_has_its_card_text():
    """push_to_hub describes each variant it publishes; a new variant without a text would fail at publish time."""
    from llm_finetune.config import QUANTIZE_VARIANTS
    from tasks.hub import QUANTIZATION_TEXT

    assert set(QUANTIZATION_TEXT) == set(QUANTIZE_VARIANTS)

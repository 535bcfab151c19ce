"""A LoRA adapter pushed by push_to_hub loads from the hub with the card's own example code.

The hub stand-in (tests/hub_standin.py) serves uploads and downloads; the base model is a
tiny random Llama pushed there first. The card's python block is run unchanged in a fresh
interpreter whose hub endpoint is the stand-in, and must print what the same base +
adapter generate locally.
"""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

from llm_finetune.config import FineTuneConfig, HubConfig, ModelConfig
from llm_finetune.evaluation.evaluate import EvalMetrics
from llm_finetune.export.hub import code_blocks, push_folder
from tests.hub_standin import HubStandIn

SECRET = "hf_adapterTEST_token_9f8e7d"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("_FSEC_HUGGINGFACE_TOKEN", SECRET)
    monkeypatch.setenv("LLM_FINETUNE_DECK_DIR", str(tmp_path / "decks"))
    server = HubStandIn({SECRET: ("alice", ["alice"])}).start()
    yield server
    server.stop()


def _report(loss):
    table = pd.DataFrame({"prompt": ["x"], "reference": ["y"], "prediction": ["y"], "correct": [True]})
    return EvalReport(metrics=EvalMetrics(rows=1, loss=loss, perplexity=2.0, exact_match=1.0, exact_match_rows=1),
                      samples=StructuredDataset(dataframe=table))


from tasks.evaluate import EvalReport  # noqa: E402
from tasks.hub import push_to_hub  # noqa: E402

pytestmark = pytest.mark.slow  # every test here trains a model or starts a process (tests/tiers.py)


def test_pushed_adapter_loads_from_the_hub_with_the_cards_snippet(hub, tokenizer, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.tiny import save_tiny_llama

    base_dir = save_tiny_llama(tmp_path / "base", tokenizer, seed=3)
    push_folder(base_dir, "alice/base", SECRET, False, "---\nlicense: apache-2.0\n---\n# base\n", endpoint=hub.url)
    base_sha = hub.repos["alice/base"].sha

    # an adapter saved the way training saves it: PEFT records the local folder the base came from
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                          LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    cfg = FineTuneConfig(model=ModelConfig(base_model="alice/base", revision=base_sha),
                         hub=HubConfig(repo_id="alice/iso", endpoint=hub.url))
    urls = push_to_hub(config=cfg, model=FlyteDirectory(str(base_dir)), adapter=FlyteDirectory(str(tmp_path / "adapter")),
                       quantized=[], base=_report(0.6), tuned=_report(0.1), variants=[])
    assert urls == [f"{hub.url}/alice/iso", f"{hub.url}/alice/iso-lora"]
    pushed = json.loads(hub.repos["alice/iso-lora"].files["adapter_config.json"])
    assert (pushed["base_model_name_or_path"], pushed["revision"]) == ("alice/base", base_sha)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    card = hub.repos["alice/iso-lora"].files["README.md"].decode()
    assert "base_model:\n- alice/base" in card and f"base_model_revision: {base_sha}" in card
    assert "library_name: peft" in card and "## Intended use and limits" in card
    (snippet,) = code_blocks(card)
    assert "alice/base" in snippet and "alice/iso-lora" in snippet

    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": SECRET, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "TRANSFORMERS_VERBOSITY": "error"}
    before = len(hub.requests)
    run = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, (run.stderr[-3000:], hub.requests[before:])
    fetched = [p for m, p, _ in hub.requests[before:] if m == "GET" and "/resolve/" in p]
    assert f"/alice/base/resolve/{base_sha}/model.safetensors" in fetched
    assert "/alice/iso-lora/resolve/main/adapter_model.safetensors" in fetched

    # the same base + adapter, loaded locally, generate the same text
    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    messages = [{"role": "user", "content": "Rewrite 5 March 2021 in ISO 8601."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = local.generate(**inputs, max_new_tokens=32, do_sample=False)
    expected = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert run.stdout.rstrip("\n") == expected and expected.strip()


def test_after_sft_then_dpo_the_pushed_adapter_loads_onto_the_pushed_sft_model_and_gives_the_tuned_logits(
        hub, tokenizer, tmp_path):
    """The DPO adapter was trained on the merged SFT model: on the hub base it would be base + DPO without SFT."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.tiny import save_tiny_llama

    base_dir = save_tiny_llama(tmp_path / "base", tokenizer, seed=3)
    push_folder(base_dir, "alice/base", SECRET, False, "---\nlicense: apache-2.0\n---\n# base\n", endpoint=hub.url)
    base_sha = hub.repos["alice/base"].sha
    sft_dir = save_tiny_llama(tmp_path / "sft", tokenizer, seed=5)  # the first stage's merged model (other weights)
    torch.manual_seed(0)
    dpo = get_peft_model(AutoModelForCausalLM.from_pretrained(sft_dir),
                         LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    dpo.save_pretrained(tmp_path / "dpo-adapter")
    dpo.merge_and_unload().save_pretrained(tmp_path / "tuned")  # the pipeline's final model: SFT + DPO merged
    tokenizer.save_pretrained(tmp_path / "tuned")

    cfg = FineTuneConfig(model=ModelConfig(base_model="alice/base", revision=base_sha),
                         hub=HubConfig(repo_id="alice/iso", endpoint=hub.url))
    urls = push_to_hub(config=cfg, model=FlyteDirectory(str(tmp_path / "tuned")),
                       adapter=FlyteDirectory(str(tmp_path / "dpo-adapter")), quantized=[], base=_report(0.6),
                       tuned=_report(0.1), variants=[], sft_model=FlyteDirectory(str(sft_dir)))
    assert urls == [f"{hub.url}/alice/iso", f"{hub.url}/alice/iso-sft", f"{hub.url}/alice/iso-lora"]
    sft_sha = hub.repos["alice/iso-sft"].sha
    pushed = json.loads(hub.repos["alice/iso-lora"].files["adapter_config.json"])
    assert (pushed["base_model_name_or_path"], pushed["revision"]) == ("alice/iso-sft", sft_sha)
    card = hub.repos["alice/iso-lora"].files["README.md"].decode()
    assert "base_model:\n- alice/iso-sft" in card and "DPO LoRA adapter on the SFT model" in card
    assert "alice/iso-sft" in hub.repos["alice/iso-sft"].files["README.md"].decode()

    # the card's own snippet, run unchanged against the stand-in, plus one line reading the logits it computes
    (snippet,) = code_blocks(card)
    probe = "\nimport json, torch\nwith torch.no_grad():\n    print(json.dumps(model(**inputs).logits[0, -1, :16].tolist()))\n"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": SECRET, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, "-c", snippet + probe], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    hub_logits = torch.tensor(json.loads(run.stdout.strip().splitlines()[-1]))

    messages = [{"role": "user", "content": "Rewrite 5 March 2021 in ISO 8601."}]
    assert "Rewrite 5 March 2021 in ISO 8601." in snippet
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").eval()(**inputs).logits[0, -1, :16]
        wrong = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "dpo-adapter").eval()
        wrong = wrong(**inputs).logits[0, -1, :16]
    torch.testing.assert_close(hub_logits, tuned, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(wrong, tuned, atol=1e-2)  # control: the adapter on the hub base is another model

"""The whole workflow, run locally the way `pyflyte run` runs it: 2 gloo processes, real training."""

from pathlib import Path

import pytest

from llm_finetune.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fine_tune_workflow_end_to_end(isolated_flyte, capfd):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_finetune.export.quantize import load_quantized
    from workflows.fine_tune import fine_tune

    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    result = fine_tune(config=cfg)

    # metrics for both models on the same held-out rows; a few steps already lower the loss
    base, tuned = result.base_metrics, result.tuned_metrics
    assert base.rows == tuned.rows == cfg.evaluate.max_samples == base.exact_match_rows
    assert 0.0 <= base.exact_match <= 1.0 and 0.0 <= tuned.exact_match <= 1.0
    assert tuned.loss < base.loss
    assert result.hub_url == ""

    # the tuned model loads with from_pretrained and generates
    model_dir = result.tuned_model.download()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Rewrite 5 March 2021 in ISO 8601."}], tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert (Path(result.adapter.download()) / "adapter_config.json").is_file()

    # the quantized model loads as int8 and generates
    qmodel = load_quantized(result.quantized_model.download())
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in qmodel.modules())
    with torch.no_grad():
        assert qmodel.generate(**enc, max_new_tokens=4, do_sample=False).shape[1] > enc["input_ids"].shape[1]

    # every quantize.variants entry is built and scored on the same rows against the tuned model
    assert [q.variant for q in result.quantized] == [v.variant for v in result.quantized_metrics] == ["int8", "gguf_q8_0"]
    assert all(v.metrics.rows == tuned.rows and v.loss_delta == v.metrics.loss - tuned.loss for v in result.quantized_metrics)
    assert (Path(result.quantized[1].model.download()) / result.quantized[1].gguf_file).is_file()

    # the run says where its outputs are
    printed = capfd.readouterr().out
    assert str(result.tuned_model.path) in printed
    for deck in ("get_data", "train", "evaluate_base", "evaluate_tuned", "evaluate_quantized", "summary"):
        page = isolated_flyte / "decks" / f"{deck}.html"
        assert page.is_file() and f"deck: file://{page}" in printed

    # an identical second run is served from the cache: same outputs, nothing retrained
    again = fine_tune(config=cfg)
    assert again.tuned_model.path == result.tuned_model.path
    assert again.tuned_metrics == tuned
    assert "deck: file://" + str(isolated_flyte / "decks" / "train.html") not in capfd.readouterr().out

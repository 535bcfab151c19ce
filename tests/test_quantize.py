"""Quantized variants: GGUF export read back by transformers, bnb variants, per-variant evaluation, config."""

import json

import pandas as pd
import pytest
import torch

from llm_finetune.config import DataConfig, EvalConfig, FineTuneConfig, QuantizeConfig, from_dict, quantize_variants, validate
from llm_finetune.errors import ConfigError


@pytest.fixture(scope="module")
def gguf_dir(base_model_dir, tmp_path_factory):
    from llm_finetune.export.quantize import quantize_variant

    return quantize_variant(base_model_dir, tmp_path_factory.mktemp("gguf"), "gguf_q8_0", name="smollm2")


@pytest.mark.slow
def test_gguf_q8_0_export_loads_in_transformers_and_matches_source(base_model_dir, tokenizer, gguf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert gguf_dir.gguf_file == "smollm2-q8_0.gguf"
    src_mb = sum(f.stat().st_size for f in base_model_dir.glob("*.safetensors")) / 2**20
    assert gguf_dir.size_mb < 0.3 * src_mb  # 8.5 bits per weight vs float32
    g = AutoModelForCausalLM.from_pretrained(gguf_dir.path, gguf_file=gguf_dir.gguf_file, dtype=torch.float32).eval()
    gtok = AutoTokenizer.from_pretrained(gguf_dir.path, gguf_file=gguf_dir.gguf_file)
    src = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Rewrite 5 March 2021 in ISO 8601."}], tokenize=False, add_generation_prompt=True)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    # the tokenizer metadata round-trips: same ids, special tokens and chat template
    assert gtok(prompt, add_special_tokens=False)["input_ids"] == enc["input_ids"][0].tolist()
    assert (gtok.eos_token_id, gtok.chat_template) == (tokenizer.eos_token_id, tokenizer.chat_template)
    with torch.no_grad():
        a, b = src(**enc).logits[0], g(**enc).logits[0]
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.999, cos  # q8_0 rounding only; a wrong Q/K permutation or tensor map gives ~0
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.85
        out_a = src.generate(**enc, max_new_tokens=8, do_sample=False)
        out_b = g.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out_a.tolist() == out_b.tolist()


@pytest.mark.slow
def test_gguf_export_refuses_unsupported_architectures_by_name(tmp_path, tokenizer):
    """llama.cpp's converter, run on the config and tokenizer files alone (no weights), names the architecture."""
    from llm_finetune.export.gguf_convert import GGUFExportError, check_exportable

    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "my_research_lm", "architectures": ["MyResearchForCausalLM"]}))
    with pytest.raises(GGUFExportError, match=r"MyResearchForCausalLM.*not supported.*llama.cpp does not convert this "
                                              r"architecture.*drop the gguf_\* entries from quantize.variants"):
        check_exportable(tmp_path)


@pytest.mark.slow
def test_gguf_export_refuses_a_tokenizer_llama_cpp_does_not_know_before_training(tmp_path):
    """A byte-level BPE trained from scratch: llama.cpp cannot tell its pre-tokenizer, so the export would write a
    file that tokenizes differently from training. Refused up front, with why and the fix."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from llm_finetune.export.gguf_convert import GGUFExportError, check_exportable

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a purchase order for 12 chairs, 3 desks"] * 50,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    hf.add_special_tokens({"eos_token": "</s>"})
    hf.save_pretrained(tmp_path)
    LlamaConfig(vocab_size=len(hf), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(GGUFExportError, match=r"LlamaForCausalLM.*pre-tokenizer.*keep the published tokenizer"):
        check_exportable(tmp_path)


@pytest.mark.slow
def test_the_embedded_model_is_exportable_from_its_metadata_alone(base_model_dir, tmp_path):
    import shutil

    from llm_finetune.export.gguf_convert import check_exportable

    for f in base_model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, tmp_path / f.name)
    assert check_exportable(tmp_path)["model_type"] == "llama"


def test_nf4_variant_loads_and_is_scored_on_the_same_rows(base_model_dir, tmp_path):
    """nf4 loads with from_pretrained and is scored on the same rows (int8 is scored in the e2e run; tiny sample for speed).

    The embeddings stay float (bitsandbytes quantizes Linear layers), hence 0.4 and not 1/8 of the size."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from llm_finetune.data.prepare import prepare
    from llm_finetune.evaluation.evaluate import evaluate
    from llm_finetune.model import load_tokenizer
    from llm_finetune.export.quantize import quantize_variant

    data = DataConfig()
    frame = prepare(data, load_tokenizer(base_model_dir)).test
    cfg = EvalConfig(max_samples=2, max_new_tokens=4, batch_size=2)
    ref, ref_table = evaluate(base_model_dir, frame, data, cfg)
    assert ref.task_metric == "exact_match" and ref.median_reference_words == 1
    q = quantize_variant(base_model_dir, tmp_path / "nf4", "nf4")
    assert q.size_mb < 0.4 * sum(f.stat().st_size for f in base_model_dir.glob("*.safetensors")) / 2**20
    model = AutoModelForCausalLM.from_pretrained(q.path)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    metrics, table = evaluate(q.path, frame, data, cfg)
    assert metrics.rows == ref.rows and list(table["prompt"]) == list(ref_table["prompt"])
    # 4-bit rounding changes the loss, but a broken load (random or zeroed weights) would be far off (loss ~ 10)
    assert metrics.loss != ref.loss and metrics.loss < 2 * ref.loss + 0.5


def test_variants_config_and_deprecated_bits():
    assert quantize_variants(QuantizeConfig()) == ["int8", "gguf_q8_0"]
    assert quantize_variants(QuantizeConfig(bits=0)) == [] and quantize_variants(QuantizeConfig(bits=4)) == ["nf4"]
    cfg = from_dict(FineTuneConfig, {"quantize": {"variants": ["int8", "nf4", "gguf_q8_0"]}})
    assert quantize_variants(validate(cfg).quantize) == ["int8", "nf4", "gguf_q8_0"]
    with pytest.raises(ConfigError, match=r"quantize.variants\[1\]: 'gguf_q4' is not one of .*did you mean"):
        validate(from_dict(FineTuneConfig, {"quantize": {"variants": ["int8", "gguf_q4"]}}))
    with pytest.raises(ConfigError, match="quantize.bits: deprecated and conflicts"):
        validate(from_dict(FineTuneConfig, {"quantize": {"bits": 8, "variants": ["nf4"]}}))


def test_long_answers_switch_the_task_metric_to_chrf(base_model_dir):
    from llm_finetune.evaluation.evaluate import evaluate

    conv = [{"role": "user", "content": "Describe a cat."},
            {"role": "assistant", "content": "A small furry animal that purrs, sleeps a lot and chases mice at night."}]
    frame = pd.DataFrame({"messages": [json.dumps(conv)] * 2, "text": [""] * 2})
    metrics, table = evaluate(base_model_dir, frame, DataConfig(), EvalConfig(max_samples=2, max_new_tokens=4, batch_size=2))
    # free-text answers are scored with chrF (issue 15), not exact match
    assert metrics.task_kind == "chrf" and metrics.task_metric == "chrf"
    assert metrics.median_reference_words > 8 and len(table) == 2


@pytest.mark.slow
def test_gguf_for_an_unsupported_base_fails_before_training(tmp_path):
    """check_outputs runs on the base model ahead of train_model, so no GPU hours are spent first."""
    from flytekit.types.directory import FlyteDirectory

    from llm_finetune.export.gguf_convert import GGUFExportError
    from tasks.quantize import check_outputs

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "my_research_lm", "architectures": ["MyResearchForCausalLM"]}))
    cfg = FineTuneConfig()
    assert "gguf_q8_0" in quantize_variants(cfg.quantize)
    with pytest.raises(GGUFExportError, match=r"GGUF export of .*MyResearchForCausalLM"):
        check_outputs(base_model=FlyteDirectory(str(tmp_path)), evaluate=cfg.evaluate, quantize=cfg.quantize)
    cfg.quantize.variants = ["int8"]
    assert check_outputs(base_model=FlyteDirectory(str(tmp_path)), evaluate=cfg.evaluate, quantize=cfg.quantize) is True

"""Flex attention under bf16 autocast gets query, key and value of one dtype (llm_finetune/training/attention.py).

Full fine-tuning trains fp32 weights under autocast; the rotary embedding leaves query and key in
fp32 while the value projection is bf16. Checked on CPU, where autocast behaves the same way:
what reaches flex attention, and that the output matches SDPA's under the same autocast.
"""

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here trains a model or starts a process (tests/tiers.py)


def _model(impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation=impl)
    return LlamaForCausalLM(cfg).eval()


def test_flex_under_autocast_gets_one_dtype_and_matches_sdpa(monkeypatch):
    import transformers.integrations.flex_attention as fa

    from llm_finetune.training.attention import register

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention",
                        ALL_ATTENTION_FUNCTIONS._global_mapping["flex_attention"])  # restored afterwards
    seen = []
    real = fa.compile_friendly_flex_attention

    def spy(query, key, value, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(fa, "compile_friendly_flex_attention", spy)
    ids = torch.randint(0, 256, (2, 32))  # 32: a multiple of 16 (packing.CPU_FLEX_LENGTH_MULTIPLE)
    flex = _model("flex_attention")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        flex(input_ids=ids, use_cache=False)
    assert seen and seen[0] == (torch.float32, torch.float32, torch.bfloat16)  # the defect, as transformers has it

    seen.clear()
    register()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = flex(input_ids=ids, use_cache=False).logits.float()
        want = _model("sdpa")(input_ids=ids, use_cache=False).logits.float()
    assert seen and set(seen) == {(torch.bfloat16,) * 3}
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)  # bf16 attention both ways
    # outside autocast nothing is cast: an fp32 model stays fp32 end to end
    seen.clear()
    with torch.no_grad():
        flex(input_ids=ids, use_cache=False)
    assert set(seen) == {(torch.float32,) * 3}


def test_training_registers_it_whenever_flex_is_loaded(tokenizer, tmp_path, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from llm_finetune.training.attention import consistent_flex_attention
    from llm_finetune.config import TrainConfig
    from llm_finetune.training.weights import load_model
    from tests.tiny import save_tiny_llama

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention",
                        ALL_ATTENTION_FUNCTIONS._global_mapping["flex_attention"])  # restored afterwards
    model = load_model(save_tiny_llama(tmp_path / "tiny", tokenizer), TrainConfig(weights="full"), bf16=False,
                        attn_implementation="flex_attention")[0]
    assert model.config._attn_implementation == "flex_attention"
    assert ALL_ATTENTION_FUNCTIONS["flex_attention"] is consistent_flex_attention

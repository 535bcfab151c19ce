"""Training and merging on a tiny randomly initialised Llama (seconds on CPU)."""

import pytest
import torch

from llm_finetune.config import DataConfig, TrainConfig
from llm_finetune.data.prepare import prepare
from llm_finetune.training.harness import train
from llm_finetune.training.weights import merge_adapter
from tests.tiny import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer)


@pytest.fixture(scope="module")
def train_frame(tokenizer):
    return prepare(DataConfig(), tokenizer).train


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.slow
def test_single_process_training_lowers_loss_and_saves_loadable_model(method, request, train_frame, tmp_path):
    """LoRA on the embedded model (what users run); full fine-tuning on the tiny random model."""
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue("base_model_dir" if method == "lora" else "tiny_model_dir")
    steps, batch = (10, 4) if method == "lora" else (30, 8)
    cfg = TrainConfig(
        weights=method, max_steps=steps, learning_rate=1e-3 if method == "lora" else 3e-3,
        per_device_batch_size=batch, logging_steps=1, warmup_ratio=0.0,
    )
    out = train(model_dir, train_frame, DataConfig(), cfg, tmp_path)
    s = out.summary
    assert s.steps == steps and s.world_size == 1
    assert s.final_loss < 0.6 * s.first_loss
    assert s.trained_tokens == pytest.approx(steps * batch * 11, rel=0.1)  # 11 completion tokens per example (answer + <|im_end|>)
    assert (out.adapter_dir is not None) == (method == "lora")
    model = AutoModelForCausalLM.from_pretrained(out.model_dir)
    assert not any("lora" in k for k in model.state_dict())


def test_merged_model_matches_adapter_model(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    merged_dir = merge_adapter(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged")
    ids = torch.randint(0, 1000, (2, 12))
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        want, got, before = fresh(ids).logits, merged(ids).logits, plain(ids).logits
    assert torch.allclose(want, got, atol=1e-4)
    assert not torch.allclose(before, got, atol=1e-3)  # the adapter really changed the model


def test_qlora_on_cpu_fails_before_loading_anything(tiny_model_dir, train_frame, tmp_path):
    from llm_finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU"):
        train(tiny_model_dir, train_frame, DataConfig(), TrainConfig(weights="qlora"), tmp_path)

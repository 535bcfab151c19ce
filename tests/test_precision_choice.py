"""What ``precision: auto`` and the attention choose per GPU generation, decided before any GPU time.

``torch.cuda.is_bf16_supported()`` is true on a T4 or V100 through emulation (slower than fp32), and
flex attention's kernels need compute capability 8.0. No such GPU exists here, so torch's CUDA
queries are answered by a stand-in for the card; the decisions are the production functions'.
"""

import pytest
import torch

from llm_finetune.config import TrainConfig
from llm_finetune.errors import ConfigError
from llm_finetune.training.precision import attention_implementation, check_hardware as _check_hardware, use_bf16 as _use_bf16, use_fp16 as _use_fp16
from llm_finetune.training.weights import load_model


@pytest.fixture
def gpu(monkeypatch):
    """``gpu(name, (major, minor))``: torch reports that card (and, as torch does, bf16 'supported' on all)."""
    def card(name: str, capability: tuple[int, int]):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return card


@pytest.mark.parametrize("name,capability,mixed,attention", [
    ("Tesla T4", (7, 5), "fp16", "sdpa"),
    ("Tesla V100-SXM2-16GB", (7, 0), "fp16", "sdpa"),
    ("NVIDIA A100-SXM4-40GB", (8, 0), "bf16", "flex_attention"),
    ("NVIDIA L4", (8, 9), "bf16", "flex_attention"),
    ("NVIDIA H200", (9, 0), "bf16", "flex_attention"),
])
def test_auto_picks_fp16_and_sdpa_where_bf16_and_flex_are_not_native(gpu, name, capability, mixed, attention):
    gpu(name, capability)
    auto = TrainConfig(precision="auto")
    assert (_use_bf16(auto), _use_fp16(auto)) == (mixed == "bf16", mixed == "fp16")
    assert attention_implementation(packed=True) == attention
    assert attention_implementation(packed=False) == "sdpa"
    _check_hardware(auto)  # auto is always accepted


def test_bf16_asked_for_on_an_emulating_gpu_fails_before_training_with_the_fix(gpu):
    gpu("Tesla T4", (7, 5))
    with pytest.raises(ConfigError, match=r"train.precision: bf16 on Tesla T4 \(compute capability 7.5\) is emulated.*use auto"):
        _check_hardware(TrainConfig(precision="bf16"))
    _check_hardware(TrainConfig(precision="fp16"))
    gpu("NVIDIA A100-SXM4-40GB", (8, 0))
    _check_hardware(TrainConfig(precision="bf16"))


def test_cpu_trains_in_fp32():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU choice")
    auto = TrainConfig(precision="auto")
    assert not _use_bf16(auto) and not _use_fp16(auto) and attention_implementation(packed=True) == "sdpa"


def test_lora_on_an_fp16_gpu_loads_the_frozen_base_in_fp16_and_keeps_the_adapters_in_fp32(gpu, tokenizer, tmp_path):
    from tests.tiny import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "tiny", tokenizer)
    gpu("Tesla T4", (7, 5))
    model = load_model(model_dir, TrainConfig(weights="lora", precision="auto"), bf16=False)[0]
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    trained = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert frozen == {torch.float16} and trained == {torch.float32}  # fp32 adapters: GradScaler can unscale them
    full = load_model(model_dir, TrainConfig(weights="full", precision="auto"), bf16=False)[0]
    assert {p.dtype for p in full.parameters()} == {torch.float32}  # fp32 master weights under autocast

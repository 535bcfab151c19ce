"""The memory guard refuses runs that cannot fit, with the numbers and the way out."""

import pytest

from llm_finetune.errors import ConfigError
from llm_finetune.training.fit import GiB, check_fits, count_parameters, training_bytes


def test_parameter_count_comes_from_the_safetensors_headers(base_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    assert count_parameters(base_model_dir) == sum(p.numel() for p in model.parameters())  # tied weights once


def test_full_fine_tuning_of_7b_on_one_80gb_gpu_is_refused_with_the_ways_out():
    with pytest.raises(ConfigError, match=r"full of a 7\.00B-parameter model needs at least 104\.3 GiB .* 80\.0 GiB.*zero3"):
        check_fits(7_000_000_000, "full", True, 0, 1, False, 80 * GiB, "GPU H100")
    check_fits(7_000_000_000, "full", True, 3, 8, False, 80 * GiB, "GPU H100")  # ZeRO-3 over 8 GPUs: 13 GiB each
    check_fits(7_000_000_000, "qlora", True, 0, 1, False, 16 * GiB, "GPU T4")  # about 3.6 GiB of nf4 weights


def test_zero_stages_shard_what_they_promise():
    full = [training_bytes(1_000, "full", True, stage, 4, False) for stage in (0, 1, 2, 3)]
    assert full == [16_000, 2_000 + 2_000 + 3_000, 2_000 + 500 + 3_000, 500 + 500 + 3_000]
    assert training_bytes(1_000, "full", True, 3, 4, True) == 500  # offload: only sharded gradients stay
    with pytest.raises(ConfigError, match="train.weights: lora of a .* use train.weights: qlora"):
        check_fits(70_000_000_000, "lora", True, 0, 1, False, 80 * GiB, "GPU A100")

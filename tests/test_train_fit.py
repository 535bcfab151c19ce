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


def test_fsdp2_is_counted_as_zero3_and_shards_lora_s_frozen_base():
    from llm_finetune.config import TrainConfig
    from llm_finetune.training.harness import sharding_stage

    assert sharding_stage(TrainConfig(sharding="fsdp2"), None) == 3 and sharding_stage(TrainConfig(), None) == 0
    assert training_bytes(1_000, "lora", True, 3, 4, False) == 500  # the frozen bf16 base, a quarter per process
    assert training_bytes(1_000, "lora", True, 0, 4, False) == 2_000
    with pytest.raises(ConfigError, match="train.sharding: fsdp2"):  # named among the ways out
        check_fits(7_000_000_000, "full", True, 0, 1, False, 80 * GiB, "GPU H100")


def test_fsdp2_trainer_arguments_and_activation_checkpointing():
    """FSDP2 via the Trainer: sharded checkpoints; gradient checkpointing is FSDP's for full weights and stays
    transformers' own for LoRA (FSDP's wrapper hid the adapter weights from PEFT)."""
    from transformers import TrainingArguments

    from llm_finetune.config import TrainConfig
    from llm_finetune.training.harness import trainer_arguments

    def args(**train):
        return trainer_arguments(TrainConfig(**train), "/tmp/x", False, False, False, None)

    assert "fsdp" not in args(gradient_checkpointing=True) and args(gradient_checkpointing=True)["gradient_checkpointing"]
    full = args(sharding="fsdp2", weights="full", gradient_checkpointing=True)
    assert full["fsdp"] is True and not full["gradient_checkpointing"]
    assert full["fsdp_config"] == {"version": 2, "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True,
                                   "cpu_offload": False, "activation_checkpointing": True,
                                   "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
    lora = args(sharding="fsdp2", weights="lora", gradient_checkpointing=True)
    assert lora["gradient_checkpointing"] and not lora["fsdp_config"]["activation_checkpointing"]
    plugin = TrainingArguments(**full).fsdp_plugin_args  # what accelerate's FSDP plugin is built from
    assert plugin["fsdp_version"] == 2 and plugin["activation_checkpointing"] is True
    assert plugin["state_dict_type"] == "SHARDED_STATE_DICT" and plugin["reshard_after_forward"] is True

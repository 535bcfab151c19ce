from pathlib import Path

import pytest
import yaml

from llm_finetune.config import FineTuneConfig, from_dict, load_config, quantize_variants, validate
from llm_finetune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DS = ROOT / "deepspeed_configs"


def test_defaults_are_valid_and_use_embedded_model_and_data():
    cfg = validate(FineTuneConfig(), DS)
    assert cfg.model.base_model == "embedded://SmolLM2-135M-Instruct"
    assert cfg.data.source == "embedded://iso_dates"
    assert (cfg.train.method, cfg.train.weights, cfg.train.nnodes, cfg.train.nproc_per_node) == ("sft", "lora", 1, 2)
    assert quantize_variants(cfg.quantize) == ["int8", "gguf_q8_0"] and cfg.hub.repo_id == ""


def test_partial_file_merges_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"train": {"max_steps": 7, "lora": {"r": 4}}, "quantize": {"bits": 4}}))
    cfg = load_config(f)
    assert cfg.train.max_steps == 7 and cfg.train.lora.r == 4 and quantize_variants(cfg.quantize) == ["nf4"]
    assert cfg.train.lora.alpha == 32 and cfg.train.learning_rate == FineTuneConfig().train.learning_rate


def test_pyflyte_json_entry_point_is_strict():
    cfg = FineTuneConfig.from_json('{"data": {"format": "dolly"}}')
    assert cfg.data.format == "dolly" and cfg.data.source == "embedded://iso_dates"
    with pytest.raises(ConfigError, match=r"train\.max_step: unknown key\. Did you mean 'max_steps'"):
        FineTuneConfig.from_json('{"train": {"max_step": 3}}')


def test_wrong_types_are_reported_with_key_path():
    with pytest.raises(ConfigError) as e:
        from_dict(FineTuneConfig, {"train": {"max_steps": "ten", "gradient_checkpointing": "yes"}, "data": [1]})
    msg = str(e.value)
    assert "train.max_steps: expected an integer" in msg
    assert "train.gradient_checkpointing: expected true or false" in msg
    assert "data: expected a mapping" in msg


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"train": {"method": "sfft"}}, "train.method: 'sfft' is not one of sft, dpo, kto, orpo (did you mean 'sft'?)"),
        ({"train": {"weights": "lorra"}}, "train.weights: 'lorra' is not one of lora, qlora, full (did you mean 'lora'?)"),
        ({"train": {"weights": "qlora"}}, "train.weights: qlora quantizes the base model to 4-bit"),
        ({"train": {"deepspeed": "zero4"}}, "train.deepspeed: no file zero4.json in deepspeed_configs/"),
        ({"quantize": {"bits": 3}}, "quantize.bits: 3 is not one of 0, 4, 8"),
        ({"hub": {"repo_id": "no-slash"}}, "hub.repo_id: 'no-slash' is not of the form owner/name"),
        ({"data": {"eval_fraction": 0.9}}, "data.eval_fraction: must be in (0, 0.5]"),
        ({"data": {"test_fraction": 0.7}}, "data.test_fraction: must be in (0, 0.5]"),
        ({"data": {"validation_fraction": 0.0}}, "data.validation_fraction: must be in (0, 0.5]"),
        ({"data": {"overlong": "truncate"}}, "data.overlong: 'truncate' is not one of drop, truncate_prompt, fail"),
        ({"data": {"max_length": 8}}, "data.max_length: must be auto or at least 16 tokens, got 8"),
        ({"data": {"max_drop_fraction": 1.5}}, "data.max_drop_fraction: must be in [0, 1]"),
        ({"data": {"truncation": True, "overlong": "fail"}}, "data.truncation: deprecated (it means data.overlong: truncate_prompt)"),
        ({"train": {"max_steps": -5}}, "train.max_steps: -5 is not a step count; give a positive number of optimizer steps, or 0 (or -1)"),
        ({"train": {"early_stopping_patience": 2, "save_steps": 0}}, "train.early_stopping_patience: stopping early compares"),
        ({"train": {"early_stopping_patience": -1}}, "train.early_stopping_patience: must be >= 0"),
        ({"train": {"nproc_per_node": 4, "gpus_per_node": 2}}, "train.nproc_per_node: 4 processes but only 2 GPUs"),
        ({"data": {"format": "sharegpt"}}, "data.format: 'sharegpt' is not one of"),
        ({"train": {"keep_checkpoints": 0}}, "train.keep_checkpoints: must be >= 1 (the newest checkpoint is what a retry"),
    ],
)
def test_validation_names_key_and_fix(override, needle):
    with pytest.raises(ConfigError) as e:
        validate(from_dict(FineTuneConfig, override), DS)
    assert needle in str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        validate(from_dict(FineTuneConfig, {"train": {"method": "x", "learning_rate": -1}, "quantize": {"bits": 5}}), DS)
    assert len(e.value.problems) == 3


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    validate(load_config(path), DS)


def test_production_configs_cover_the_seed_runs():
    runs = {p.stem: load_config(p) for p in (ROOT / "configs").glob("*.yaml")}
    assert runs["llama7b_alpaca_lora"].model.base_model == "huggyllama/llama-7b"
    assert runs["llama13b_alpaca_lora"].model.base_model == "huggyllama/llama-13b"
    dolly = runs["dolly_pythia12b_full_zero3"]
    assert (dolly.train.method, dolly.train.weights, dolly.train.deepspeed, dolly.data.format) == ("sft", "full", "zero3", "dolly")
    q = runs["llama3_8b_qlora"]
    assert q.train.weights == "qlora" and q.train.gpus_per_node >= 1


@pytest.mark.parametrize("old, new", [
    ({"method": "full"}, ("sft", "full")),
    ({"method": "qlora", "gpus_per_node": 1, "nproc_per_node": 1}, ("sft", "qlora")),
    ({"method": "dpo", "dpo": {"weights": "full"}}, ("dpo", "full")),
])
def test_the_old_spelling_is_accepted_and_reported_as_deprecated(old, new):
    """train.method: lora|qlora|full and train.dpo.weights still load, moved to train.method + train.weights."""
    with pytest.warns(FutureWarning, match="deprecated: write train"):
        cfg = from_dict(FineTuneConfig, {"train": old, **({"data": {"format": "preference"}} if new[0] == "dpo" else {})})
    assert (cfg.train.method, cfg.train.weights, cfg.train.dpo.weights) == (*new, "")
    validate(cfg, DS)
    again = FineTuneConfig.from_json(__import__("json").dumps(cfg.to_dict()))  # a task boundary: no second warning
    assert (again.train.method, again.train.weights) == new


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs_are_json_with_auto_values(name):
    import json

    cfg = json.loads((DS / f"{name}.json").read_text())
    assert cfg["zero_optimization"]["stage"] == int(name[4])
    assert cfg["train_micro_batch_size_per_gpu"] == "auto"


def test_max_length_auto_and_int_forms(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  max_length: auto\n")
    assert load_config(f).data.max_length == 0 == FineTuneConfig().data.max_length  # auto is the default
    f.write_text("data:\n  max_length: 1024\n")
    assert validate(load_config(f), DS).data.max_length == 1024
    with pytest.raises(ConfigError, match=r"data.max_length: expected an integer or auto, got 'long'"):
        FineTuneConfig.from_json('{"data": {"max_length": "long"}}')
    with pytest.raises(ConfigError, match=r"train.max_steps: expected an integer, got 'auto'"):
        FineTuneConfig.from_json('{"train": {"max_steps": "auto"}}')


@pytest.mark.parametrize("steps", [0, -1, 1])
def test_max_steps_zero_or_minus_one_mean_epochs(steps):
    validate(from_dict(FineTuneConfig, {"train": {"max_steps": steps}}), DS)


def test_deprecated_data_keys_map_to_their_replacements():
    from llm_finetune.config import effective_test_fraction, overlong_policy

    cfg = from_dict(FineTuneConfig, {"data": {"eval_fraction": 0.2, "truncation": True}})
    validate(cfg, DS)
    assert effective_test_fraction(cfg.data) == 0.2 and overlong_policy(cfg.data) == "truncate_prompt"
    with pytest.raises(ConfigError, match="data.eval_fraction: deprecated alias of data.test_fraction and conflicts"):
        validate(from_dict(FineTuneConfig, {"data": {"eval_fraction": 0.2, "test_fraction": 0.3}}), DS)


def test_gpus_the_cuda_image_cannot_run_are_refused():
    from llm_finetune.config import FineTuneConfig, TrainConfig, validate
    from llm_finetune.errors import ConfigError

    cfg = FineTuneConfig(train=TrainConfig(gpus_per_node=8, nproc_per_node=8, accelerator="nvidia-tesla-v100"))
    with pytest.raises(ConfigError, match="train.accelerator: 'nvidia-tesla-v100' is a GPU generation"):
        validate(cfg)
    validate(FineTuneConfig(train=TrainConfig(gpus_per_node=1, nproc_per_node=1, accelerator="nvidia-tesla-t4")))


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(name):
    from llm_finetune.config import load_config, validate

    root = Path(__file__).resolve().parents[1]
    validate(load_config(root / "configs" / name), deepspeed_dir=root / "deepspeed_configs")


def test_interruptible_auto_means_spot_only_for_gpu_training(tmp_path):
    """The runbook's only spot pools are GPU pools: an interruptible CPU pod would never schedule."""
    from llm_finetune.config import TrainConfig, TrainOps, is_interruptible, split_train

    assert FineTuneConfig().train.interruptible is None and not is_interruptible(TrainConfig())  # default: auto, CPU
    assert is_interruptible(TrainConfig(gpus_per_node=1, nproc_per_node=1))  # auto on GPUs: spot
    assert not is_interruptible(TrainConfig(gpus_per_node=8, nproc_per_node=8, interruptible=False))
    assert is_interruptible(TrainConfig(interruptible=True))  # explicit: as given (a cluster with CPU spot nodes)
    keyed, ops = split_train(TrainConfig(gpus_per_node=1, nproc_per_node=1))
    assert ops == TrainOps() and is_interruptible(ops, keyed.gpus_per_node)  # the ops half needs the GPU count
    f = tmp_path / "c.yaml"
    for text, want in (("auto", None), ("null", None), ("true", True), ("false", False)):
        f.write_text(f"train:\n  interruptible: {text}\n")
        assert load_config(f).train.interruptible is want, text
    with pytest.raises(ConfigError, match=r"train.interruptible: expected true, false or auto, got 'sometimes'"):
        FineTuneConfig.from_json('{"train": {"interruptible": "sometimes"}}')
    runs = {p.stem: load_config(p) for p in (ROOT / "configs").glob("*.yaml")}
    assert {name for name, c in runs.items() if is_interruptible(c.train)} == {
        name for name, c in runs.items() if c.train.gpus_per_node > 0}  # shipped: spot for GPU training only


def test_k_quant_variants_need_llama_cpp_and_say_how_to_get_it(monkeypatch):
    import importlib.util

    from llm_finetune.config import QuantizeConfig

    cfg = FineTuneConfig(quantize=QuantizeConfig(variants=["gguf_q4_k_m", "gguf_q8_0"]))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(ConfigError, match=r"quantize.variants: gguf_q4_k_m is made by llama.cpp's quantizer.*gguf-check"):
        validate(cfg)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if real("llama_cpp") is not None:
        validate(cfg)  # accepted where llama-cpp-python is installed


@pytest.mark.parametrize(
    "train, needle",
    [
        ({"sharding": "fsdp"}, "train.sharding: 'fsdp' is not one of none, fsdp2 (did you mean 'fsdp2'?)"),
        ({"sharding": "fsdp2", "deepspeed": "zero3"},
         "train.sharding: fsdp2 and train.deepspeed: zero3 both shard the model, and only one can; set train.deepspeed: none"),
        ({"sharding": "fsdp2", "weights": "qlora", "gpus_per_node": 2},
         "train.sharding: fsdp2 with train.weights: qlora is not supported here"),
        ({"sharding": "fsdp2", "nproc_per_node": 1},
         "train.sharding: fsdp2 shards the model over processes, but train.nnodes x train.nproc_per_node is 1"),
        ({"sharding": "fsdp2", "fsdp": {"cpu_offload": True}},
         "train.fsdp.cpu_offload: offloads from GPU memory to CPU memory, and this run trains on the CPU"),
        ({"fsdp": {"cpu_ofload": True}}, "train.fsdp.cpu_ofload: unknown key. Did you mean 'cpu_offload'?"),
    ],
)
def test_fsdp2_refusals_name_the_key_and_the_fix(train, needle):
    with pytest.raises(ConfigError) as e:
        validate(from_dict(FineTuneConfig, {"train": train}), DS)
    assert needle in str(e.value)


@pytest.mark.parametrize("train", [
    {"sharding": "fsdp2", "weights": "full"},  # configs/smoke.yaml's CPU run with FSDP2
    {"sharding": "fsdp2", "weights": "lora", "method": "sft", "gradient_checkpointing": True},
    {"sharding": "fsdp2", "nnodes": 2, "nproc_per_node": 1},
    {"sharding": "fsdp2", "weights": "full", "gpus_per_node": 8, "nproc_per_node": 8, "fsdp": {"cpu_offload": True,
                                                                                              "reshard_after_forward": False}},
])
def test_fsdp2_configs_that_run_validate(train):
    cfg = validate(from_dict(FineTuneConfig, {"train": train}), DS)
    assert cfg.train.sharding == "fsdp2" and cfg.train.deepspeed == "none"


@pytest.mark.parametrize("method, data", [("dpo", "preference"), ("kto", "unpaired"), ("orpo", "preference")])
def test_fsdp2_takes_the_preference_methods(method, data):
    validate(from_dict(FineTuneConfig, {"train": {"method": method, "sharding": "fsdp2"}, "data": {"format": data}}), DS)

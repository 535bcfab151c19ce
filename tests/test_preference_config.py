"""DPO keys in the one config tree: defaults, partial sections, and validation messages with key and fix."""

from pathlib import Path

import pytest

from llm_finetune.config import FineTuneConfig, from_dict, load_config, validate
from llm_finetune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DS = ROOT / "deepspeed_configs"


def test_shipped_dpo_configs_are_valid():
    smoke = validate(load_config(ROOT / "configs" / "dpo_smoke.yaml"), DS)
    assert (smoke.train.method, smoke.train.dpo.weights, smoke.train.dpo.reference) == ("dpo", "lora", "auto")
    two = validate(load_config(ROOT / "configs" / "sft_then_dpo.yaml"), DS)
    assert two.train.method == "lora" and two.preference.enabled and two.preference.train.method == "dpo"


def test_partial_preference_section_keeps_dpo_defaults():
    cfg = from_dict(FineTuneConfig, {"preference": {"enabled": True, "train": {"dpo": {"beta": 0.3}}}})
    assert cfg.preference.train.method == "dpo" and cfg.preference.train.dpo.beta == 0.3
    assert cfg.preference.data.source == "embedded://iso_dates_preference" and cfg.preference.data.format == "preference"
    assert FineTuneConfig().preference.enabled is False
    validate(cfg, DS)


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"train": {"method": "dpo", "dpo": {"loss_type": "ipoo"}}}, "train.dpo.loss_type: 'ipoo' is not one of sigmoid, ipo"),
        ({"train": {"method": "dpo", "dpo": {"beta": 0}}}, "train.dpo.beta: must be > 0"),
        ({"train": {"method": "dpo", "dpo": {"weights": "qlora"}}}, "train.dpo.weights: qlora needs a GPU"),
        ({"train": {"method": "dpo"}, "data": {"packing": True}}, "data.packing: DPO trains on padded chosen/rejected pairs"),
        ({"train": {"method": "dpo"}, "data": {"format": "alpaca"}}, "data.format: 'alpaca' holds no preference pairs"),
        ({"data": {"format": "preference"}}, "data.format: preference pairs train with train.method: dpo"),
        ({"train": {"method": "dpo"}, "preference": {"enabled": True}}, "preference.enabled: the preference stage runs DPO after"),
        ({"preference": {"enabled": True, "train": {"method": "lora"}}}, "preference.train.method: must be dpo"),
        ({"preference": {"enabled": True, "train": {"dpo": {"reference": "copy"}}}},
         "preference.train.dpo.reference: 'copy' is not one of auto"),
    ],
)
def test_dpo_validation_names_key_and_fix(override, needle):
    with pytest.raises(ConfigError) as e:
        validate(from_dict(FineTuneConfig, override), DS)
    assert needle in str(e.value)

"""Preference keys (DPO, KTO, ORPO) in the one config tree: defaults, partial sections, and validation messages with key and fix."""

from pathlib import Path

import pytest

from llm_finetune.config import FineTuneConfig, from_dict, load_config, validate
from llm_finetune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DS = ROOT / "deepspeed_configs"


def test_shipped_dpo_configs_are_valid():
    smoke = validate(load_config(ROOT / "configs" / "dpo_smoke.yaml"), DS)
    assert (smoke.train.method, smoke.train.weights, smoke.train.dpo.reference) == ("dpo", "lora", "auto")
    two = validate(load_config(ROOT / "configs" / "sft_then_dpo.yaml"), DS)
    assert (two.train.method, two.train.weights) == ("sft", "lora") and two.preference.enabled
    assert two.preference.train.method == "dpo"


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
        ({"train": {"method": "dpo", "weights": "qlora"}}, "train.weights: qlora quantizes the base model to 4-bit"),
        ({"train": {"method": "dpo"}, "data": {"packing": True}}, "data.packing: train.method dpo trains on whole preference rows"),
        ({"train": {"method": "dpo"}, "data": {"format": "alpaca"}},
         "data.format: 'alpaca' is not data train.method dpo trains on (preference rows: data.format auto or preference); "
         "alpaca data trains with train.method sft"),
        ({"data": {"format": "preference"}}, "preference data trains with train.method dpo or orpo"),
        ({"data": {"format": "unpaired"}}, "unpaired data trains with train.method kto"),
        ({"train": {"method": "kto"}, "data": {"format": "preference"}}, "train.method kto trains on (unpaired rows"),
        ({"train": {"method": "kto", "kto": {"loss_type": "bco"}}}, "train.kto.loss_type: 'bco' is not one of kto, apo_zero_unpaired"),
        ({"train": {"method": "kto", "kto": {"desirable_weight": 0}}}, "train.kto.desirable_weight: must be > 0"),
        ({"train": {"method": "orpo", "orpo": {"beta": -1}}}, "train.orpo.beta: must be > 0"),
        ({"train": {"method": "orpo"}, "data": {"packing": True}}, "data.packing: train.method orpo trains on whole"),
        ({"train": {"method": "dpo"}, "preference": {"enabled": True}}, "preference.enabled: the preference stage tunes on preferences after"),
        ({"preference": {"enabled": True, "train": {"method": "sft"}}}, "preference.train.method: the preference stage tunes on preferences, so it takes dpo or kto or orpo"),
        ({"preference": {"enabled": True, "train": {"dpo": {"reference": "copy"}}}},
         "preference.train.dpo.reference: 'copy' is not one of auto"),
    ],
)
def test_dpo_validation_names_key_and_fix(override, needle):
    with pytest.raises(ConfigError) as e:
        validate(from_dict(FineTuneConfig, override), DS)
    assert needle in str(e.value)

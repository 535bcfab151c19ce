"""Shared fixtures: the embedded base model is materialised once per test session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tasks/, workflows/, images/ are top-level packages
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    from llm_finetune.config import EMBEDDED_MODEL
    from llm_finetune.model import materialize

    return materialize(EMBEDDED_MODEL, tmp_path_factory.mktemp("base-model"))


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    from llm_finetune.model import load_tokenizer

    return load_tokenizer(base_model_dir)

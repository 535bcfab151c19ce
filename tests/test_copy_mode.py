"""`pyflyte run --remote` without `--copy all`: the pods get the Python modules but not the data files.

The images hold no source, so the embedded datasets (llm_finetune/data/*.jsonl) and the DeepSpeed
configs (deepspeed_configs/*.json) reach a pod only in a `--copy all` bundle. validate_config fails
first, naming the missing files and the fix; and a missing embedded file never fingerprints to the
digest of empty bytes (which every missing file would share, so a cache key built on it would hit).
"""

import hashlib
from pathlib import Path

import pytest

from llm_finetune.config import FineTuneConfig
from llm_finetune.data import sources
from llm_finetune.errors import ConfigError
from llm_finetune.package_data import DEEPSPEED_CONFIGS, missing_package_files, package_data_files
from llm_finetune.revisions import data_revision, sha256_path

ROOT = Path(__file__).resolve().parents[1]
EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()


def test_the_list_of_package_files_is_what_the_repository_ships():
    """A new DeepSpeed config or embedded dataset must be added to the list the check uses."""
    assert sorted(DEEPSPEED_CONFIGS) == sorted(p.name for p in (ROOT / "deepspeed_configs").glob("*.json"))
    assert {p.resolve() for p in sources.EMBEDDED.values()} == {p.resolve() for p in (ROOT / "llm_finetune" / "data").glob("*.jsonl")}
    assert missing_package_files(ROOT / "deepspeed_configs") == []
    assert len(package_data_files(ROOT / "deepspeed_configs")) == len(DEEPSPEED_CONFIGS) + len(sources.EMBEDDED)


@pytest.fixture
def copy_auto_pod(tmp_path, monkeypatch):
    """What a pod sees after `--copy auto`: no deepspeed_configs/ folder and no embedded iso_dates.jsonl."""
    import tasks.validate

    monkeypatch.setattr(tasks.validate, "DEEPSPEED_DIR", tmp_path / "deepspeed_configs")
    monkeypatch.setitem(sources.EMBEDDED, "embedded://iso_dates", tmp_path / "llm_finetune" / "data" / "iso_dates.jsonl")
    return tmp_path


def test_validate_config_fails_first_naming_the_missing_files_and_the_fix(copy_auto_pod):
    from tasks.validate import validate_config

    with pytest.raises(Exception) as e:
        validate_config(config=FineTuneConfig())
    msg = str(e.value)
    assert "Invalid deployment" in msg
    assert "iso_dates.jsonl" in msg and "deepspeed_configs/zero3.json" in msg
    assert "pyflyte run --remote --copy all" in msg


def test_a_missing_embedded_dataset_is_an_error_not_the_digest_of_no_bytes(copy_auto_pod):
    with pytest.raises(ConfigError, match=r"data\.source: embedded://iso_dates is the packaged file .* missing here.*--copy all"):
        data_revision("embedded://iso_dates")
    with pytest.raises(FileNotFoundError, match="nothing to fingerprint"):
        sha256_path(copy_auto_pod / "nothing-here.jsonl")


def test_present_files_still_fingerprint_their_bytes(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_bytes(b'{"a": 1}\n')
    assert sha256_path(f) == "sha256:" + hashlib.sha256(b'{"a": 1}\n').hexdigest()
    assert data_revision("embedded://iso_dates") not in ("", EMPTY_DIGEST)

"""A local run whose cached outputs were deleted (a wiped /tmp) recomputes them instead of crashing.

Real flytekit cached tasks fill the real local cache (isolated per test); their folders are then deleted
as a /tmp clean-up would, and the next run must run exactly those tasks again.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from flytekit import task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

CALLS: list[str] = []


def _folder(name: str) -> str:
    d = tempfile.mkdtemp(prefix=f"cached-{name}-")
    (Path(d) / "weights.bin").write_bytes(b"x" * 16)
    return d


@dataclasses.dataclass
class Trained:
    model: FlyteDirectory
    loss: float


@task(cache=True, cache_version="1")
def make_folder(name: str) -> FlyteDirectory:
    CALLS.append(name)
    return FlyteDirectory(_folder(name))


@task(cache=True, cache_version="1")
def make_trained(name: str) -> list[Trained]:  # a dataclass field inside a list: msgpack in a collection
    CALLS.append(name)
    return [Trained(model=FlyteDirectory(_folder(name)), loss=1.0)]


@task(cache=True, cache_version="1")
def make_table(name: str) -> StructuredDataset:
    CALLS.append(name)
    return StructuredDataset(dataframe=pd.DataFrame({"a": [1, 2]}))


def _run_all() -> tuple[str, str, str]:
    return (make_folder(name="base").path, make_trained(name="train")[0].model.path,
            make_table(name="table").literal.uri)  # the local parquet folder flytekit wrote


def test_deleted_outputs_are_forgotten_and_only_their_tasks_run_again(isolated_flyte):
    from tasks.local_cache import forget_missing_outputs

    CALLS.clear()
    base, trained, table = _run_all()
    assert _run_all() == (base, trained, table) and CALLS == ["base", "train", "table"]  # served from the cache
    assert forget_missing_outputs() == {}  # nothing is missing: nothing forgotten

    shutil.rmtree(base)
    shutil.rmtree(trained)
    forgotten = forget_missing_outputs()
    assert sorted(k.split("-")[0] for k in forgotten) == [f"{__name__}.make_folder", f"{__name__}.make_trained"]
    assert sorted(p for paths in forgotten.values() for p in paths) == sorted([base, trained])

    CALLS.clear()
    base2, trained2, table2 = _run_all()
    assert CALLS == ["base", "train"] and table2 == table  # the table's entry was kept
    assert Path(base2, "weights.bin").is_file() and Path(trained2, "weights.bin").is_file()

    # a deleted table (a StructuredDataset's local parquet folder) is found too
    assert Path(table).is_dir()
    shutil.rmtree(table)
    assert [k.split("-")[0] for k in forget_missing_outputs()] == [f"{__name__}.make_table"]


def test_validate_config_forgets_them_at_the_start_of_a_local_fine_tune(isolated_flyte, capfd):
    from llm_finetune.config import FineTuneConfig
    from tasks.validate import validate_config

    CALLS.clear()
    base = make_folder(name="base").path
    shutil.rmtree(base)
    validate_config(config=FineTuneConfig())  # the first task of workflows/fine_tune.py
    printed = capfd.readouterr().out
    assert f"[cache] {__name__}.make_folder: its cached output {base} no longer exists" in printed
    assert Path(make_folder(name="base").path, "weights.bin").is_file() and CALLS == ["base", "base"]

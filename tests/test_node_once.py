"""One download per node: two processes ask for the same base model / input at once, one fetches.

- ``materialize`` with a hub id, in 2 processes at once, against the hub stand-in and the real
  ``huggingface_hub`` client: every file is served once.
- The train task's input fetch (tasks/node_inputs.py) in 2 processes, against an object-store
  stand-in: an fsspec filesystem (protocol ``countfs://``) that the real flytekit file access
  reads, and that counts the files it serves.
"""

import multiprocessing as mp
import os
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from tests.hub_standin import HubStandIn
from tests.tiny import save_tiny_llama

pytestmark = pytest.mark.slow  # every test here trains a model or starts a process (tests/tiers.py)


class CountingFS(LocalFileSystem):
    """A local directory behind a remote-looking protocol; logs every file it serves to $COUNTFS_LOG."""

    protocol = ("countfs",)
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("countfs://"):
            path = path[len("countfs://"):]
        return LocalFileSystem._strip_protocol(path)

    def get_file(self, rpath, lpath, **kwargs):
        if self.isdir(rpath):  # fsspec "gets" a directory by creating it: nothing is served
            return super().get_file(rpath, lpath, **kwargs)
        with open(os.environ["COUNTFS_LOG"], "a") as log:
            log.write(f"{os.getpid()} {self._strip_protocol(rpath)}\n")
        return super().get_file(rpath, lpath, **kwargs)


fsspec.register_implementation("countfs", CountingFS, clobber=True)


def _materialize(repo_id, out_dir, barrier, results):
    from llm_finetune.model import materialize

    barrier.wait()  # both processes ask at the same moment
    results.put(str(materialize(repo_id, out_dir)))


def _fetch_model(remote, barrier, results):
    from flytekit.types.directory import FlyteDirectory

    from tasks.node_inputs import node_local_directory

    directory = FlyteDirectory(path="/nonexistent")
    directory._remote_source = remote  # what flytekit sets for an input that lives in the object store
    barrier.wait()
    results.put(str(node_local_directory(directory)))


def _run_two(target, *args) -> list[str]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [results.get(timeout=5) for _ in procs]


@pytest.fixture
def tiny_files(tmp_path, tokenizer) -> dict[str, bytes]:
    d = save_tiny_llama(tmp_path / "tiny-src", tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def test_two_processes_download_the_base_model_from_the_hub_once(tiny_files, tmp_path, monkeypatch):
    from llm_finetune.model import check_loadable_dir

    hub = HubStandIn(tokens={}).start()
    try:
        hub.seed("acme/tiny-llama", tiny_files)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        out = tmp_path / "node-local" / "base-model"
        paths = _run_two(_materialize, "acme/tiny-llama", str(out))
    finally:
        hub.stop()
    assert paths == [str(out)] * 2
    served = sorted(hub.downloads)
    assert served == sorted(f"acme/tiny-llama/{name}" for name in tiny_files)  # each file once, not twice
    check_loadable_dir(out)
    assert all((out / name).read_bytes() == data for name, data in tiny_files.items())
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(tiny_files)


def test_two_processes_fetch_the_train_task_inputs_once_per_node(tiny_files, tmp_path, monkeypatch):
    remote = tmp_path / "bucket" / "base-model"
    remote.mkdir(parents=True)
    for name, data in tiny_files.items():
        (remote / name).write_bytes(data)
    log = tmp_path / "served.log"
    monkeypatch.setenv("COUNTFS_LOG", str(log))
    monkeypatch.setenv("LLM_FINETUNE_NODE_CACHE", str(tmp_path / "node-cache"))
    paths = _run_two(_fetch_model, f"countfs://{remote}")
    assert paths[0] == paths[1]  # both processes read the same node-local copy
    served = [line.split() for line in log.read_text().splitlines()]
    assert sorted(Path(p).name for _, p in served) == sorted(tiny_files)  # every file fetched once
    assert len({pid for pid, _ in served}) == 1  # by one process
    local = Path(paths[0])
    assert all((local / name).read_bytes() == data for name, data in tiny_files.items())
    assert sorted(p.name for p in (tmp_path / "node-cache").iterdir() if not p.name.startswith(local.name)) == []

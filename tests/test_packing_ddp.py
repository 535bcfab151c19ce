"""Packed training under DDP: the model the Trainer hands to ``compute_loss`` is wrapped
(DistributedDataParallel around the PEFT model), and the attention mask must still be the
one the loaded attention implementation needs. Two gloo processes, production data path
(tests/packed_ddp_worker.py); packed logits and loss must equal per-example ones.

Eager attention shows a wrong mask on CPU (it adds whatever 4D mask it gets to the
scores); flex attention runs forward on CPU and needs a ``BlockMask``.
"""

import json

import pytest

from tests.tiny import run_torchrun, save_tiny_llama

pytestmark = pytest.mark.slow  # every test here trains a model or starts a process (tests/tiers.py)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer, max_position_embeddings=512)


@pytest.mark.parametrize("attn", ["eager", "flex_attention"])
def test_packed_logits_equal_per_example_under_ddp(attn, tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_torchrun({"model_dir": str(tiny_dir), "out_dir": str(out), "attn": attn}, tmp_path,
                        timeout=180, worker="packed_ddp_worker.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for rank in (0, 1):
        r = json.loads((out / f"rank{rank}.json").read_text())
        assert all(len(s) >= 2 for s in r["seq_lens"])  # rows really hold several examples
        assert r["max_logit_diff"] < 1e-4, r
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5), r

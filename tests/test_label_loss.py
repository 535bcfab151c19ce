"""The training loss computed only at labelled positions, in chunks (llm_finetune/training/label_loss.py),
through the production ``FineTuneTrainer.compute_loss``, equals the standard loss over full
logits (``model(...).logits`` + ``F.cross_entropy``) in value and in every gradient."""

import pytest
import torch
import torch.nn.functional as F

import llm_finetune.training.label_loss as label_loss
from llm_finetune.training.collate import TokenCollator, model_inputs
from llm_finetune.training.packing import IGNORE_INDEX, pack_examples
from tests.test_packing import _examples
from tests.tiny import tiny_llama_config


def _model(tokenizer, method):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, max_position_embeddings=512))  # tied head, as SmolLM2
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
    return model


def _trainer(model, tmp_path):
    from transformers import TrainingArguments

    from llm_finetune.training.trainer import FineTuneTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False,
                             label_names=["labels"])
    return FineTuneTrainer(model=model, args=args)


def _reference(model, batch, n_items):
    inputs = {k: v for k, v in model_inputs(model, batch).items() if k != "labels"}
    logits = model(**inputs).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / n_items


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("packed", [True, False])
def test_label_only_loss_and_gradients_equal_full_logits_loss(tokenizer, tmp_path, monkeypatch, method, packed):
    examples = _examples(tokenizer, 6, seed=3)
    rows = pack_examples(examples, 256) if packed else examples[:3]
    batch = TokenCollator(tokenizer.pad_token_id, packed=packed)(rows)
    model = _model(tokenizer, method)
    trainer = _trainer(model, tmp_path)
    n_items = torch.tensor(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) + 7)  # as if accumulated
    monkeypatch.setattr(label_loss, "CHUNK_ELEMENTS", 40 * len(tokenizer))  # 40-row chunks: several per batch
    head_widths = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: head_widths.append(out.shape[1]))
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    hook.remove()
    assert head_widths == [0]  # the model's own head projected nothing: no full logits tensor
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = {n: p.grad.clone() for n, p in trainable}
    model.zero_grad()
    ref = _reference(model, batch, n_items)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in trainable:
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)
    # evaluation (no num_items_in_batch, no grad): the mean over this batch's labelled tokens
    with torch.no_grad():
        eval_loss, _ = trainer.compute_loss(model, dict(batch), return_outputs=True)
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        torch.testing.assert_close(eval_loss, _reference(model, batch, n), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_backward_of_a_128k_vocabulary_head_holds_one_weight_gradient(tmp_path):
    """Peak memory on CPU (a fresh process's peak RSS): forward + backward of the chunked loss over a
    128,256 x 1,024 fp32 head adds about 1.4 weights (the fp32 weight gradient and chunks of logits).
    Returning a scaled copy of the gradient, as before, added 2.0 (measured here, one thread)."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from llm_finetune.training.label_loss import linear_cross_entropy_sum\n"
        "torch.manual_seed(0)\n"
        "V, H, N = 128256, 1024, 512\n"
        "w = torch.randn(V, H, requires_grad=True); h = torch.randn(N, H, requires_grad=True)\n"
        "t = torch.randint(0, V, (N,))\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "linear_cross_entropy_sum(h, w, t).backward()\n"
        "assert w.grad is not None and w.grad.shape == w.shape\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024 / (V * H * 4))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    weights = float(run.stdout.strip().splitlines()[-1])
    assert weights < 1.8, f"the backward's peak grew by {weights:.2f} weight sizes"

"""The training loss computed only at labelled positions, in chunks (llm_finetune/label_loss.py),
through the production ``FineTuneTrainer.compute_loss``, equals the standard loss over full
logits (``model(...).logits`` + ``F.cross_entropy``) in value and in every gradient."""

import pytest
import torch
import torch.nn.functional as F

import llm_finetune.label_loss as label_loss
from llm_finetune.collate import TokenCollator, model_inputs
from llm_finetune.packing import IGNORE_INDEX, pack_examples
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

    from llm_finetune.trainer import FineTuneTrainer

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

"""Causal-LM loss computed only where a label is, in chunks, without the full logits tensor.

With completion-only loss most positions (the prompts, and the padding) carry no label,
yet the standard forward projects every position onto the whole vocabulary and keeps
the ``[batch, length, vocab]`` logits (and their gradient) alive for the backward pass:
for a 49k vocabulary that is the largest tensor of a small model's step. Here the
vocabulary projection runs only on the hidden states of labelled positions, a chunk of
rows at a time; each chunk's gradient is computed right away (softmax - one-hot), so at
most one chunk of logits exists at any time. Same matmul count as the standard path
(forward, grad of the hidden states, grad of the weight), on fewer rows.

The model is still called as a whole (through DDP and the other wrappers, so their hooks
run): a forward pre-hook on the output embedding takes the final hidden states and hands
the head an empty slice. ``label_only_loss`` returns None where this cannot be done
exactly (ZeRO-3 partitioned or FSDP2 sharded head, a head with LoRA or a bias, logit soft-capping or
scaling after the head) or not measured yet (a torch.compile'd model, where adding and
removing the hook every step would make dynamo recompile); the caller then uses the
standard loss.
"""

from __future__ import annotations

import torch

from llm_finetune.training.collate import unwrap
from llm_finetune.encoding import IGNORE_INDEX

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in fp32 (341 rows of a 49k vocabulary)
_POST_HEAD_CONFIG = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``target``; gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_rows):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[s : s + chunk_rows], target[s : s + chunk_rows]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if want_h or want_w:
                g = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
                g[torch.arange(len(t), device=g.device), t] -= 1.0  # d(sum CE)/d logits
                if want_h:
                    grad_h[s : s + chunk_rows] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if want_w:
                    grad_w.addmm_(g.T, h.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        # Scaled in place: the weight gradient of a 128k x 4096 head is 2.1 GB in fp32, and a scaled
        # copy would hold a second one (a third with the cast) at the backward's peak. ``.to`` is free
        # when the weight is fp32 (full fine-tuning's master weights). One backward per forward, as
        # the Trainer runs it; a second backward through the same graph would scale twice.
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             chunk_rows: int | None = None) -> torch.Tensor:
    """sum_i CE(hidden[i] @ weight.T, target[i]) over rows, one chunk of logits at a time."""
    rows = chunk_rows or max(16, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, target, rows)


def _compiled(model) -> bool:
    """torch.compile'd anywhere in the wrapper chain (a per-step hook would make dynamo recompile)."""
    while model is not None:
        if hasattr(model, "_orig_mod"):
            return True
        model = getattr(model, "module", None)
    return False


def _head_weight(model):
    """The output projection's weight if the chunked loss is exact for this model, else None."""
    if _compiled(model):
        return None, None
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is None or any(getattr(config, k, None) not in (None, 1, 1.0) for k in _POST_HEAD_CONFIG):
        return None, None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:  # LoRA on the head, a bias, or fully_shard's subclass
        return None, None
    if hasattr(head.weight, "ds_id"):  # ZeRO-3: the weight is only gathered inside the head's forward
        return None, None
    if type(head.weight).__name__ == "DTensor":  # FSDP2: a shard outside the forward of the head's group
        return None, None
    return head, head.weight


def label_only_loss(model, inputs: dict, num_items_in_batch=None, chunk_rows: int | None = None):
    """The causal-LM loss of ``model(**inputs)`` from labelled positions only, or None if not exact here.

    Same value as transformers' ``ForCausalLMLoss``: labels shifted by one, -100 ignored,
    summed and divided by ``num_items_in_batch`` when given (the token-normalised loss over
    the accumulated batch), else averaged over this batch's labelled tokens.
    """
    head, weight = _head_weight(model)
    if head is None or "labels" not in inputs:
        return None
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    captured = {}

    def take_hidden(module, args):
        captured["h"] = args[0]
        return (args[0][:, :0],)  # the head projects nothing; we do it below on labelled rows

    handle = head.register_forward_pre_hook(take_hidden)
    try:
        model(**inputs)
    finally:
        handle.remove()
    hidden = captured["h"]
    if hidden.shape[1] != labels.shape[1]:  # logits_to_keep or similar: not the whole sequence
        raise ValueError(f"head saw {hidden.shape[1]} positions for {labels.shape[1]} labels")
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    total = linear_cross_entropy_sum(hidden[:, :-1][keep], weight, target[keep], chunk_rows)
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device, dtype=total.dtype)
    return total / keep.sum().clamp(min=1)

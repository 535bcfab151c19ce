"""Batches for the trainer: padded examples (the baseline) or packed rows.

The trainer counts the tokens that carry loss; the collator counts real (non-padding)
tokens and token slots, so benchmarks can report the padding share. Packed batches carry
``position_ids`` (restarting at 0 per example) and ``document_ids``; ``model_inputs``
turns them into what the model's attention implementation needs.
"""

from __future__ import annotations

import torch

from llm_finetune.training.packing import IGNORE_INDEX, document_ids, position_ids

# Attention implementations that isolate packed examples: transformers 5 builds the
# block-diagonal causal mask itself from ``position_ids`` when no attention mask and no
# cache are passed (masking_utils.find_packed_sequence_indices), a BlockMask for flex
# attention, with each layer's own mask function (sliding windows included).
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")


class TokenCollator:
    """Right-pads a batch to its longest row (rounded up to ``pad_to_multiple_of``).

    ``packed=False``: one example per row, 2D ``attention_mask`` (the usual HF path).
    ``packed=True``: rows hold several examples (``seq_lens``); the batch gets per-example
    ``position_ids`` and ``document_ids`` for a block-diagonal causal mask.
    """

    def __init__(self, pad_id: int, packed: bool = False, pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.packed = packed
        self.multiple = max(1, pad_to_multiple_of)
        self.real_tokens = 0  # non-padding tokens
        self.batch_tokens = 0  # all token slots, padding included

    def __call__(self, batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        width = -(-width // self.multiple) * self.multiple
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.as_tensor(b["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(b["labels"], dtype=torch.long)
        lens = [list(b.get("seq_lens") or [len(b["input_ids"])]) for b in batch]
        self.real_tokens += sum(sum(x) for x in lens)
        self.batch_tokens += ids.numel()
        out = {"input_ids": ids, "labels": labels}
        if self.packed:
            out["position_ids"] = position_ids(lens, width)
            out["document_ids"] = document_ids(lens, width)
        else:
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, b in enumerate(batch):
                mask[i, : len(b["input_ids"])] = 1
            out["attention_mask"] = mask
        return out


def unwrap(model):
    """The ``PreTrainedModel`` inside DDP / DeepSpeed / torch.compile wrappers and a PEFT model.

    The Trainer hands ``compute_loss`` the wrapped model, which has no ``config`` of its own.
    """
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_implementation(model) -> str:
    impl = getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)
    if impl is None:
        raise TypeError(f"cannot tell the attention implementation of {type(model).__name__}: it has no config")
    return impl


def model_inputs(model, batch: dict) -> dict:
    """Drop ``document_ids`` and let the model build the packed mask from the restarted ``position_ids``.

    No attention mask, and ``use_cache=False`` always: with a mask or a cache, transformers skips
    the packed-sequence detection and attention would cross examples. An own flex ``BlockMask``
    would replace the model's mask functions and drop sliding windows.
    """
    if "document_ids" not in batch:
        return batch
    batch = dict(batch)
    batch.pop("document_ids")
    impl = attention_implementation(model)
    if impl not in PACKED_ATTENTION:
        raise ValueError(
            f"packing needs one of {', '.join(PACKED_ATTENTION)} attention to isolate examples, not {impl!r}; "
            "set data.packing: false or load the model with one of those"
        )
    batch["use_cache"] = False
    return batch

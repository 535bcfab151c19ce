"""Batches for the trainer: padded examples (the baseline) or packed rows.

The trainer counts the tokens that carry loss; the collator counts real (non-padding)
tokens and token slots, so benchmarks can report the padding share. Packed batches carry
``document_ids``; ``model_inputs`` turns them into the attention mask the model's
attention implementation needs, on the model's device.
"""

from __future__ import annotations

import torch

from llm_finetune.packing import IGNORE_INDEX, attention_inputs, document_ids, position_ids


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


def model_inputs(model, batch: dict) -> dict:
    """Replace ``document_ids`` by the attention mask this model's attention needs."""
    if "document_ids" not in batch:
        return batch
    batch = dict(batch)
    docs = batch.pop("document_ids")
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    dtype = next(model.parameters()).dtype
    batch["attention_mask"] = attention_inputs(docs, impl, dtype)
    return batch

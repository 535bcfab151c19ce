"""Flex attention with one dtype for query, key and value under autocast.

Full fine-tuning keeps fp32 master weights and trains under bf16 autocast. The projections
come out of autocast in bf16, but the rotary embedding multiplies query and key by fp32
cos/sin (computed in the hidden states' dtype, fp32), so flex attention receives fp32
query and key beside a bf16 value: flex is not on autocast's list and does not cast them
(SDPA is, and does). Depending on the torch version that raises or falls back to slow
fp32 kernels. ``register`` replaces transformers' ``flex_attention`` entry with a wrapper
that casts the three to autocast's dtype (outside autocast: to the value's), then calls
transformers' own function. Measured on CPU under bf16 autocast (tests/test_attention_dtype.py):
the dtypes reaching flex were (float32, float32, bfloat16) before, all bfloat16 after.
"""

from __future__ import annotations

import torch


def _common_dtype(query: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return value.dtype


def consistent_flex_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' flex attention on query, key and value of one dtype."""
    from transformers.integrations.flex_attention import flex_attention_forward

    dtype = _common_dtype(query, value)
    if not (query.dtype == key.dtype == value.dtype == dtype):
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Route every model's ``flex_attention`` through ``consistent_flex_attention`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register("flex_attention", consistent_flex_attention)

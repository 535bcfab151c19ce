"""Packing several examples into one ``max_length`` row without cross-contamination.

Padding every example to the longest in its batch wastes most of the compute on short
instruction data. Packing fills rows with whole examples instead (best-fit decreasing,
so rows are nearly full), and keeps the examples independent:

- attention: a block-diagonal causal mask, so a token sees only earlier tokens of its
  own example. transformers 5 builds it from the restarted ``position_ids`` when the
  forward gets no attention mask and ``use_cache=False`` (with a cache it does not, and
  examples leak into each other), for SDPA and eager as a dense mask and for flex
  attention as a ``BlockMask`` whose empty blocks are skipped. Built by the model's own
  mask functions, it keeps what each layer adds: sliding windows (Mistral, Gemma-2/3's
  local layers) stay in force inside a packed row (``tests/test_packing.py`` checks
  Mistral and Gemma-2 against the examples run alone); ``collate.model_inputs`` sets it up;
- positions: ``position_ids`` restart at 0 for every example, as if it were alone;
- loss: the first token of every example gets label -100, so the last token of the
  previous example is never trained to predict it.

With these three, the logits and loss of a packed row equal those of the examples run
one by one (``tests/test_packing.py`` checks it).
"""

from __future__ import annotations

import bisect

import torch

IGNORE_INDEX = -100


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of at most ``capacity``; deterministic for equal inputs.

    Longest items first; each goes into the fullest bin it still fits in (O(n log n) with
    a sorted list of free space). Items longer than ``capacity`` are an error: the data
    step drops, truncates or rejects them before packing.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (free space, bin id), sorted
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity}")
        if n <= 0:
            continue
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            space, b = free.pop(pos)
            bins[b].append(i)
            if space - n > 0:
                bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            if capacity - n > 0:
                bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples into rows of at most ``max_length`` tokens.

    Each example is a dict with ``input_ids`` and ``labels`` (and optionally
    ``source_row``); each packed row has ``input_ids``, ``labels``, ``seq_lens`` and
    ``source_rows``. Example boundaries are kept in ``seq_lens``.
    """
    bins = best_fit_decreasing([len(e["input_ids"]) for e in examples], max_length)
    rows = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        for i in members:
            ids.extend(examples[i]["input_ids"])
            labels.extend(mask_first_label(examples[i]["labels"]))
        rows.append(
            {
                "input_ids": ids,
                "labels": labels,
                "seq_lens": [len(examples[i]["input_ids"]) for i in members],
                "source_rows": [int(examples[i].get("source_row", i)) for i in members],
            }
        )
    return rows


def mask_first_label(labels: list[int]) -> list[int]:
    """The first token of an example is never a prediction target (nothing precedes it)."""
    return [IGNORE_INDEX, *labels[1:]] if labels else []


def packing_efficiency(seq_lens: list[list[int]], max_length: int) -> float:
    """Share of the ``len(rows) * max_length`` token slots that hold real tokens."""
    used = sum(sum(s) for s in seq_lens)
    return used / (len(seq_lens) * max_length) if seq_lens else 0.0


def document_ids(seq_lens: list[list[int]], width: int) -> torch.Tensor:
    """[batch, width] ids of the example each position belongs to.

    Padding after the last example forms its own document, so padded query rows attend
    to something (an all-masked row would give NaN in SDPA and poison the gradients).
    """
    out = torch.empty((len(seq_lens), width), dtype=torch.long)
    for b, lens in enumerate(seq_lens):
        pos = 0
        for d, n in enumerate(lens):
            out[b, pos : pos + n] = d
            pos += n
        out[b, pos:] = len(lens)
    return out


def position_ids(seq_lens: list[list[int]], width: int) -> torch.Tensor:
    """[batch, width] positions restarting at 0 for every example (and for the padding)."""
    out = torch.zeros((len(seq_lens), width), dtype=torch.long)
    for b, lens in enumerate(seq_lens):
        pos = 0
        for n in [*lens, width - sum(lens)]:
            out[b, pos : pos + n] = torch.arange(n)
            pos += n
    return out


# Key lengths that torch's compiled CPU flex attention computes correctly on every x86 CPU.
# torch 2.13's inductor C++ flex template (CppMicroGemmFP32Vec, torch/_inductor/codegen/cpp_micro_gemm.py)
# computes q @ k^T 16 key columns at a time; for a last block of fewer columns, its tail kernel takes the
# full-block path whenever that tail is a multiple of the vector width (`N % VLEN == 0`) and then reads and
# writes all 16 columns. With AVX2 (8 floats a vector) a tail of exactly 8 columns (key length = 8 mod 16)
# takes it: 8 key rows past the end are read, and for a key length under 128 the last query row's extra
# 8 scores land on the running row maxima of the first 8 queries, so those rows come out wrong or NaN,
# depending on stale memory (with AVX-512 a tail is never a multiple of 16 and the branch is dead).
# No upstream issue was found for it (bench/NOTES.md: "Flex attention NaN on AVX2 CPUs"). Lengths that
# are multiples of 16 leave no tail; CPU callers of flex pad to this (padding after a causal example,
# or a packed row's padding document, cannot change the real tokens' logits).
CPU_FLEX_LENGTH_MULTIPLE = 16

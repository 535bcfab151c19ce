"""Parse a GGUF file once while transformers loads it, not three times.

Rebuilding the embedded model as safetensors (model.py) asks transformers for the tokenizer,
the config and the weights of one GGUF file. Each request builds a fresh ``gguf.GGUFReader``
(5.5 s for SmolLM2: the reader walks ~250k metadata parts, mostly the vocabulary), and the
weight loader builds a ``TensorNameMap`` for every tensor (397 x 16 ms). Measured on the
default run's 2-core machine: the rebuild took 20 s, and 14 s with one parse (same bytes written).

``shared_gguf_parsing()`` makes both pure functions of their arguments for the duration of a
``with`` block: the reader per (path, size, mtime), the name map per (arch, blocks). Both
are read-only (the reader is a read-only memmap). transformers imports them from the ``gguf``
module at call time, so patching the module's attributes is enough; if a later gguf or
transformers release changes that, the loads still work, only slower.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator


@contextlib.contextmanager
def shared_gguf_parsing() -> Iterator[None]:
    import gguf

    original_reader, original_map = gguf.GGUFReader, getattr(gguf, "get_tensor_name_map", None)
    readers: dict[tuple, object] = {}

    def reader(path, mode="r"):
        if mode != "r":
            return original_reader(path, mode)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    if original_map is not None:
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader = original_reader
        if original_map is not None:
            gguf.get_tensor_name_map = original_map

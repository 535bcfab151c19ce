"""The train task's inputs, fetched from the object store once per node instead of once per process.

flytekit hands every torchrun worker the same input literals; each worker calling
``FlyteDirectory.download()`` or ``StructuredDataset.open().all()`` pulls its own copy of
the base model and data (8 GPUs: 8 copies of the weights on one disk). Here the first
process on the node fetches into a node-local directory under a file lock and the others
read it (llm_finetune/training/node_once.py). Local inputs (a local run) are read where they are.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from flytekit.core.context_manager import FlyteContextManager
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

from llm_finetune.training.node_once import fetch_once_per_node


def node_local_directory(directory: FlyteDirectory) -> Path:
    """A node-local copy of a directory input (the base model)."""
    source = getattr(directory, "_remote_source", None)  # set by flytekit when the input lives in the object store
    if not source:
        return Path(directory.download())  # already local: nothing to fetch
    fa = FlyteContextManager.current_context().file_access
    return fetch_once_per_node(f"directory:{source}", lambda d: fa.get_data(source, str(d), is_multipart=True))


def node_local_frame(dataset: StructuredDataset) -> pd.DataFrame:
    """A data input as a DataFrame, read from the object store by one process per node."""
    fa = FlyteContextManager.current_context().file_access
    uri = dataset.uri
    if not uri or not fa.is_remote(uri):
        return dataset.open(pd.DataFrame).all()
    local = fetch_once_per_node(f"dataset:{uri}", lambda d: dataset.open(pd.DataFrame).all().to_parquet(d / "data.parquet"))
    return pd.read_parquet(local / "data.parquet")

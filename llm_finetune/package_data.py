"""The data files the code reads at run time from beside itself, and which of them are missing.

The container images hold no source (images/specs.py): on a cluster the code arrives as the
fast-registration bundle. ``pyflyte run --remote`` defaults to ``--copy auto``, which bundles
only the imported Python modules, so these files are absent in the pods unless the run (or the
registration, ``make register``) used ``--copy all``. ``validate_config`` checks them first and
fails with that fix instead of a later task failing on a missing file.
"""

from __future__ import annotations

from pathlib import Path

# deepspeed_configs/*.json that train.deepspeed may name; tests/test_copy_mode.py keeps this list equal to the folder
DEEPSPEED_CONFIGS = ("zero1.json", "zero2.json", "zero3.json", "zero3_offload.json")


def package_data_files(deepspeed_dir: Path) -> list[Path]:
    """Every data file a task may read from the code's folders: the embedded datasets and the DeepSpeed configs."""
    from llm_finetune.data.sources import EMBEDDED

    return [*EMBEDDED.values(), *(deepspeed_dir / name for name in DEEPSPEED_CONFIGS)]


def missing_package_files(deepspeed_dir: Path) -> list[Path]:
    """The files of ``package_data_files`` that are not here."""
    return [f for f in package_data_files(deepspeed_dir) if not f.is_file()]

"""Flyte-free core of the fine-tuning pipeline.

Everything here runs without flytekit: data loading and formatting, training,
evaluation, quantization and publishing. The Flyte tasks in ``tasks/`` are thin
wrappers around these functions, so the same code can be unit-tested, benchmarked
and run on a bare GPU box.
"""

__version__ = "0.1.0"

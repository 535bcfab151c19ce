"""Evaluation: base vs tuned scores, metrics with intervals, generation, benchmarks."""

"""Optional zero-shot multiple-choice benchmarks (PIQA, BoolQ, OpenBookQA, ...) via lm-eval-harness.

Off by default (``evaluate.lm_eval_tasks: []``): the real benchmarks download their data
from the hub and take minutes per model. ``lm_eval`` is an optional extra
(``pip install -c constraints.txt '.[lm-eval]'``); asking for benchmarks without it is a
clear error raised when the config is checked, not after training.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from llm_finetune.config import EvalConfig
from llm_finetune.errors import FineTuneError

INSTALL_HINT = "pip install -c constraints.txt '.[lm-eval]' (or set evaluate.lm_eval_tasks: [])"


class BenchmarkError(FineTuneError):
    """lm-eval-harness cannot run as configured."""


def check_available(cfg: EvalConfig) -> None:
    if cfg.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:
        raise BenchmarkError(f"evaluate.lm_eval_tasks is {cfg.lm_eval_tasks} but lm_eval is not installed: {INSTALL_HINT}")
    if cfg.lm_eval_include_path and not Path(cfg.lm_eval_include_path).is_dir():
        raise BenchmarkError(f"evaluate.lm_eval_include_path: {cfg.lm_eval_include_path} is not a directory of task YAMLs")


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str):
    """Indexing lm-eval's thousands of task YAMLs takes seconds; do it once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path or None)


def run_benchmarks(model_dir: str | Path, cfg: EvalConfig, batch_size: int = 8) -> dict[str, float]:
    """Zero-shot accuracy per task: ``{task: acc}`` (and ``{task}/acc_norm`` where the task reports it)."""
    if not cfg.lm_eval_tasks:
        return {}
    check_available(cfg)
    import torch
    from lm_eval import simple_evaluate

    manager = _task_manager(cfg.lm_eval_include_path)
    unknown = [t for t in cfg.lm_eval_tasks if t not in manager.all_tasks]
    if unknown:
        raise BenchmarkError(f"evaluate.lm_eval_tasks: unknown task(s) {unknown}; e.g. piqa, boolq, openbookqa, or a task in lm_eval_include_path")
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    out = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype},
        tasks=list(cfg.lm_eval_tasks),
        num_fewshot=0,
        batch_size=batch_size,
        limit=cfg.lm_eval_limit or None,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    scores: dict[str, float] = {}
    for task, result in out["results"].items():
        for key, name in (("acc,none", task), ("acc_norm,none", f"{task}/acc_norm")):
            if isinstance(result.get(key), (int, float)):
                scores[name] = float(result[key])
    return scores

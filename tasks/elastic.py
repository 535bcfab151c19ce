"""An Elastic task configured per run, that serializes and re-loads with that configuration.

Why this exists: flytekit's ``node.with_overrides(task_config=Elastic(nnodes=2, ...))``
only swaps the task's config object. The task type ("python-task" vs "pytorch"), the
PyTorchJob replica count and the ``min_nodes``/``max_nodes`` that the worker hands to
torch elastic were fixed when the module-level task was created, so an ``nnodes: 2``
run would be submitted as a single pod (decoding the dynamic's DynamicJobSpec shows
``type: python-task``, ``workerReplicas: 1``). And on the worker, the default resolver
re-imports the module-level task, whose launch config is the default one.

``configure_elastic`` returns a copy of the task built for the given ``Elastic`` config,
and ``elastic_resolver`` writes that config into the container arguments and rebuilds
the same copy inside the pod, so the PyTorchJob spec and torchrun's launch config agree.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from typing import List

from flytekit.configuration import SerializationSettings
from flytekit.core.base_task import TaskResolverMixin
from flytekit.core.tracker import TrackedInstance, extract_task_module
from flytekitplugins.kfpytorch import Elastic
from flytekitplugins.kfpytorch.task import PytorchElasticFunctionTask

_FIELDS = ("nnodes", "nproc_per_node", "max_restarts")


def configure_elastic(base: PytorchElasticFunctionTask, elastic: Elastic) -> PytorchElasticFunctionTask:
    """A copy of ``base`` that runs (and serializes) with ``elastic``'s nodes and processes."""
    from torch.distributed import run

    task = copy.copy(base)
    task._task_config = elastic
    task.min_nodes, task.max_nodes = run.parse_min_max_nnodes(str(elastic.nnodes))
    multi_node = task.max_nodes > 1
    task._task_type = PytorchElasticFunctionTask._ELASTIC_TASK_TYPE if multi_node else (
        PytorchElasticFunctionTask._ELASTIC_TASK_TYPE_STANDALONE
    )
    # the copy shares the base's module and variable name, which the resolver records
    task._base_location = extract_task_module(base)[1:3]
    task.set_resolver(elastic_resolver)
    task.reset_command_fn()  # the copied command function is bound to ``base`` and its resolver
    return task


class ElasticResolver(TrackedInstance, TaskResolverMixin):
    """Container args: ``task-module M task-name T nnodes N nproc_per_node P max_restarts R``."""

    def name(self) -> str:
        return "ElasticResolver"

    def load_task(self, loader_args: List[str]) -> PytorchElasticFunctionTask:
        args = dict(zip(loader_args[::2], loader_args[1::2]))
        base = getattr(importlib.import_module(args["task-module"]), args["task-name"])
        elastic = dataclasses.replace(
            base.task_config,
            nnodes=int(args["nnodes"]) if args["nnodes"].isdigit() else args["nnodes"],
            nproc_per_node=int(args["nproc_per_node"]),
            max_restarts=int(args["max_restarts"]),
        )
        return configure_elastic(base, elastic)

    def loader_args(self, settings: SerializationSettings, task: PytorchElasticFunctionTask) -> List[str]:  # type: ignore[override]
        module, name = task._base_location
        cfg = task.task_config
        return ["task-module", module, "task-name", name, *(x for f in _FIELDS for x in (f, str(getattr(cfg, f))))]

    def get_all_tasks(self):  # only used by flytekit for notebook/pickled tasks
        raise NotImplementedError


elastic_resolver = ElasticResolver()

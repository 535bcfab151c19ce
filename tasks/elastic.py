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

The copies are ``RecoverableElasticTask``s: flytekit classifies a failed launch by the first
failed worker's marker file, which a rank killed by a signal never writes, and lets the
launcher's own rendezvous errors escape unclassified; both would end the attempt as a
non-retryable user error. See ``RecoverableElasticTask``. Before launching, they carry the
previous attempt's newest checkpoint into the attempt's own prefix (tasks/checkpoint.py).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import signal
from typing import Any, List

from flytekit.configuration import SerializationSettings
from flytekit.core.base_task import TaskResolverMixin
from flytekit.core.tracker import TrackedInstance, extract_task_module
from flytekit.exceptions.user import FlyteRecoverableException, FlyteUserRuntimeException
from flytekitplugins.kfpytorch import Elastic
from flytekitplugins.kfpytorch.task import PytorchElasticFunctionTask

from tasks.checkpoint import FlyteCheckpointStore

_FIELDS = ("nnodes", "nproc_per_node", "max_restarts")


# What a signal that killed a rank most likely means, for the retry's message
_SIGNAL_CAUSES = {
    signal.SIGKILL: "most likely the kernel's OOM killer (host memory over the pod's limit; see the node's "
                    "kernel log), or the node going away",
    signal.SIGABRT: "most likely the NCCL watchdog aborting a collective that timed out "
                    "(train.collective_timeout_s), or a native library's abort",
    signal.SIGSEGV: "a segmentation fault in native code",
    signal.SIGBUS: "a bus error, often shared memory (/dev/shm) running out",
    signal.SIGTERM: "terminated from outside (node drain or preemption)",
}
_RESUME = "Flyte will retry, and the next attempt resumes from the last checkpoint"


def signal_failure_message(error: BaseException) -> str | None:
    """For a ``ChildFailedError`` whose first failed rank was killed by a signal, a message naming the
    rank, the signal and its likely cause; None for anything else (a Python exception in a rank)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if not isinstance(error, ChildFailedError):
        return None
    rank, first = error.get_first_failure()
    if first.exitcode >= 0:
        return None
    try:
        sig = signal.Signals(-first.exitcode)
        name, cause = sig.name, _SIGNAL_CAUSES.get(sig, "a transient fault outside the training code")
    except ValueError:
        name, cause = f"signal {-first.exitcode}", "a transient fault outside the training code"
    others = sorted(r for r in error.failures if r != rank)
    also = f"; rank(s) {', '.join(map(str, others))} failed after it" if others else ""
    return (f"transient failure, {_RESUME}: rank {rank} (local rank {first.local_rank}, pid {first.pid}) was killed "
            f"by {name}, {cause}{also}")


def divergence_message(error: BaseException) -> str | None:
    """For a ``ChildFailedError`` whose first failed rank stopped at a non-finite loss (the trainers'
    ``FloatingPointError``), that rank's message; None for anything else."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if not isinstance(error, ChildFailedError):
        return None
    _, first = error.get_first_failure()
    message = first.message  # the rank's error file: {"message": "FloatingPointError: ...", "extraInfo": {...}}
    if isinstance(message, dict):
        message = message.get("message", "")
    message = str(message)
    return message if message.startswith("FloatingPointError") else None


def is_launcher_fault(error: BaseException) -> bool:
    """Whether ``error``, raised by torch elastic's launcher itself (not by a rank), is transient:
    the rendezvous timing out or closing (a late node still pulling its image, a peer pod gone), the
    store not answering, or the agent's own distributed errors."""
    from torch.distributed import DistError
    from torch.distributed.elastic.rendezvous import RendezvousError

    if isinstance(error, (RendezvousError, DistError, ConnectionError, TimeoutError)):
        return True
    module = type(error).__module__ or ""
    return module.startswith("torch.distributed.elastic") and type(error).__name__ != "ChildFailedError"


class RecoverableElasticTask(PytorchElasticFunctionTask):
    """flytekit's Elastic task, with every transient death of the launch classified RECOVERABLE.

    flytekit raises ``FlyteRecoverableException`` only when the first failed rank left the
    plugin's marker (a ``FlyteRecoverableException`` in Python, tasks/common.py ``recoverable``).
    A rank killed by a signal (the OOM killer's SIGKILL, a segfault, the NCCL watchdog's SIGABRT)
    leaves none, and a rendezvous or agent error is raised by the launcher outside that check:
    both are re-raised here as ``FlyteRecoverableException`` naming the rank and the signal.
    A Python exception in a rank (config, data, CUDA out of memory) keeps flytekit's verdict.
    """

    def execute(self, **kwargs) -> Any:
        # The attempt's first act, before the rendezvous, the workers or any download: keep the resume
        # chain whole should this attempt die in start-up (tasks/checkpoint.py ``carry_forward``).
        store = FlyteCheckpointStore.current()
        if store is not None:
            store.carry_forward()
        try:
            return super().execute(**kwargs)
        except FlyteRecoverableException:
            raise
        except FlyteUserRuntimeException as e:
            message = signal_failure_message(e.value)
            if message is None:
                # a sweep trial that diverged is a result (its trial loses), not a failed sweep
                diverged = divergence_message(e.value)
                handler = getattr(self, "on_divergence", None)
                if diverged is not None and handler is not None:
                    result = handler(kwargs, diverged)
                    if result is not None:
                        return result
                raise
            raise FlyteRecoverableException(f"{message}\n{e.value}", timestamp=e.timestamp) from e.value
        except Exception as e:
            if not is_launcher_fault(e):
                raise
            raise FlyteRecoverableException(
                f"transient failure, {_RESUME}: the torch elastic launcher failed before or between the ranks "
                f"(rendezvous, store or agent): {type(e).__name__}: {e}"
            ) from e


def recoverable_elastic(task: PytorchElasticFunctionTask) -> RecoverableElasticTask:
    """Make ``task`` (an ``@task(task_config=Elastic(...))``) a ``RecoverableElasticTask``, in place."""
    if not isinstance(task, RecoverableElasticTask):
        task.__class__ = RecoverableElasticTask
    return task


def configure_elastic(base: PytorchElasticFunctionTask, elastic: Elastic) -> PytorchElasticFunctionTask:
    """A copy of ``base`` that runs (and serializes) with ``elastic``'s nodes and processes."""
    from torch.distributed import run

    task = recoverable_elastic(copy.copy(base))
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

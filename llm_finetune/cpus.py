"""How many CPUs this process may really use: the container's CPU limit, not the node's cores.

In a Kubernetes pod ``os.cpu_count()`` is the node's core count (64 on a large node) while
the pod's ``limits.cpu`` (say 2) is enforced as a CFS quota. A runtime that starts one
thread per reported core (llama.cpp's default is half of them) then runs 32 threads in a
2-CPU quota and spends most of its time throttled. The quota is in the cgroup files:
``cpu.max`` (cgroup v2: "<quota> <period>" or "max <period>") or ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us`` (v1).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _quota(cgroup: Path) -> float | None:
    """CPUs allowed by the cgroup's CFS quota; None when unlimited or unreadable."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus(cgroup: Path | None = None) -> int:
    """The CPUs this process can run on, capped by the container's CPU limit (at least 1)."""
    cgroup = CGROUP if cgroup is None else cgroup
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _quota(cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def use_container_cpus() -> int:
    """Size torch's intra-op thread pool to the container's CPU limit (unless OMP_NUM_THREADS is set).

    torch starts one thread per CPU in the affinity mask, i.e. per node core in a pod, so a
    2-CPU evaluation pod on a 64-core node would run 64 threads under a 2-CPU quota.
    """
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(available_cpus())
    return torch.get_num_threads()

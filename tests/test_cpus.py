"""The CPU count runtimes size their threads by: the container's CPU limit, not the node's cores."""

import math
import os

from llm_finetune.cpus import available_cpus


def _affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_cgroup_v2_quota_caps_the_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # limits.cpu: 1500m
    assert available_cpus(tmp_path) == min(_affinity(), 2)


def test_cgroup_v2_without_a_limit_uses_the_affinity_mask(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == _affinity()


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert available_cpus(tmp_path) == _affinity()


def test_no_cgroup_files_and_a_fractional_quota(tmp_path):
    assert available_cpus(tmp_path / "absent") == _affinity()
    (tmp_path / "cpu.max").write_text("20000 100000\n")  # 200m: still one thread
    assert available_cpus(tmp_path) == 1 == max(1, min(_affinity(), math.ceil(0.2)))


def test_torch_threads_follow_the_container_limit_unless_omp_is_set(tmp_path, monkeypatch):
    import torch

    from llm_finetune.cpus import use_container_cpus

    before = torch.get_num_threads()
    monkeypatch.setattr("llm_finetune.cpus.CGROUP", tmp_path)
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # limits.cpu: 1
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert use_container_cpus() == 2  # the user's (or launcher's) setting wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert use_container_cpus() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

"""The CPU threads sampling and evaluation use (eval/inference/threads.py): OMP_NUM_THREADS when set, else the
CPUs this process may use, capped by a cgroup quota and shared among a launch's processes; --threads checked."""

from __future__ import annotations

import os

import pytest
import torch

from sdkd.cli.errors import UserError
from sdkd.eval.inference import threads


@pytest.fixture
def cpus() -> int:
    return len(os.sched_getaffinity(0))


def test_omp_num_threads_wins(cpus):
    assert threads.default_threads({"OMP_NUM_THREADS": str(cpus + 3)}) == cpus + 3


def test_without_omp_the_affinity_shared_among_local_processes(monkeypatch, cpus):
    monkeypatch.setattr(threads, "cpu_quota", lambda: None)
    assert threads.default_threads({}) == cpus
    assert threads.default_threads({"OMP_NUM_THREADS": "", "LOCAL_WORLD_SIZE": "2"}) == max(1, cpus // 2)
    assert threads.default_threads({"LOCAL_WORLD_SIZE": str(cpus * 4)}) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert threads.default_threads({}) == 8
    monkeypatch.setattr(threads, "cpu_quota", lambda: 3)  # a container allowed 3 of the 8 CPUs
    assert threads.default_threads({}) == 3


def test_cgroup_quota_is_read_rounded_up(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("250000 100000\n")
    assert threads.cpu_quota(cpu_max) == 3
    cpu_max.write_text("max 100000\n")
    assert threads.cpu_quota(cpu_max) is None
    assert threads.cpu_quota(tmp_path / "missing") is None


def test_set_threads_sets_torch_and_refuses_fewer_than_one(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.set_threads(None) == 1 and torch.get_num_threads() == 1
        for bad in (0, -1):
            with pytest.raises(UserError, match=f"--threads must be at least 1, got {bad}"):
                threads.set_threads(bad)
    finally:
        torch.set_num_threads(before)

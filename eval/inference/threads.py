"""How many CPU threads sampling and evaluation use (eval/sample.py, eval/evaluate.py, the demo: `--threads N`).

torch starts one thread per core of the machine, whatever share of it this process has: in a container with a
CPU quota, pinned to some cores, or beside other processes of a launch, its threads outnumber the CPUs it gets
and wait on each other (about 10x slower sampling on a busy CPU). The default is the CPUs this process may run
on (its affinity, capped by a cgroup CPU quota) shared among the processes of a launch on this machine;
OMP_NUM_THREADS, when set, wins, as it does for torch itself.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from sdkd.cli.errors import UserError

HELP = ("CPU threads for torch (default: OMP_NUM_THREADS if set, else the CPUs this process may use, shared among "
        "the processes of a launch on this machine)")


def cpu_quota(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """The CPUs a cgroup v2 quota allows ("QUOTA PERIOD", rounded up); None without a quota."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 file, or "max": no quota
        return None


def default_threads(environ=os.environ) -> int:
    """OMP_NUM_THREADS when it is a whole number >= 1; else the CPUs of this process's affinity (capped by the
    cgroup quota) divided by LOCAL_WORLD_SIZE (the processes a launcher started on this machine), at least 1."""
    omp = environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) >= 1:
        return int(omp)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cpus = min(cpus, quota)
    local = environ.get("LOCAL_WORLD_SIZE", "")
    return max(1, cpus // (int(local) if local.isdigit() and int(local) >= 1 else 1))


def set_threads(threads: int | None) -> int:
    """torch's CPU threads: `threads` (--threads), else `default_threads()`; returns the number set."""
    import torch

    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    threads = default_threads() if threads is None else threads
    torch.set_num_threads(threads)
    return threads

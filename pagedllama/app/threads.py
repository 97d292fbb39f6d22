"""How many threads PyTorch's CPU ops use: by default, one per core that is idle at start.

PyTorch starts one intra-op thread per core, and at the end of every parallel op its threads
wait for each other. When another process keeps a core busy, the thread that shares that core
gets it only in the scheduler's time slices, and every op waits for it: on a 2-core machine with
one core taken, `llama3-paged.py 4` runs 3-4x slower with 2 threads than with one, and far
slower still when the other core is loaded too (BENCHMARKS.md). Counting the cores left idle by other processes, just before the run, keeps the
threads off busy cores while still using every core of an idle machine. `--threads N` or an
explicit OMP_NUM_THREADS is used as given.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

IDLE_SAMPLE_S = 0.1  # how long the cores' idle time is watched before choosing
PROC_STAT = Path("/proc/stat")


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(idle, total) clock ticks of the given CPUs since boot, from /proc/stat (Linux)."""
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    idle = total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            idle += ticks[3] + ticks[4]
            total += sum(ticks)
    return (idle, total) if total else None


def _cpus() -> set[int] | None:
    """The CPUs this process may run on (None where the OS does not say)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def idle_cores(sample_s: float = IDLE_SAMPLE_S) -> float | None:
    """How many of this process's CPUs other processes left idle over `sample_s` seconds (None if unknown)."""
    cpus = _cpus()
    if not cpus:
        return None
    before = _cpu_times(cpus)
    time.sleep(sample_s)
    after = _cpu_times(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return None
    return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])


def choose_threads(requested: int | None) -> str:
    """Set PyTorch's intra-op threads: `requested`, else OMP_NUM_THREADS's, else one per idle core
    (rounded down: a thread too many costs far more than one too few). Returns what was chosen, and why."""
    if requested is not None:
        torch.set_num_threads(requested)
        return f"{requested} (--threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
    cpus, idle = _cpus(), idle_cores()
    if not cpus or idle is None:
        return f"{torch.get_num_threads()} (PyTorch's default; --threads N to choose)"
    threads = max(1, min(len(cpus), int(idle + 0.25)))
    torch.set_num_threads(threads)
    return f"{threads} ({idle:.1f} of {len(cpus)} cores idle at start; --threads N to choose)"

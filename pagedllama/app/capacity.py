"""Capacity planning: the real scheduler and allocator over real request lengths, no forward pass.

A dry run (an `Engine` with no model: the scheduler and block manager alone) admits, grows, preempts and frees exactly as a real run
does, so it finds in seconds what a GPU run would take minutes to show: how much memory
each twin reserves step by step, and the largest batch that fits its KV memory: no request
ever waited for blocks and none was preempted (`SchedulerStats.fits_in_memory`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..engine.config import EngineConfig
from ..engine.engine import build_engine
from ..engine.memory import MemorySample
from ..engine.sampling import SamplingParams
from ..engine.scheduler import SchedulerStats
from ..engine.sequence import Request
from ..engine.waste import WasteBreakdown
from ..errors import OutOfKVMemory
from ..model.parallel import SINGLE


@dataclass
class DryRun:
    """One twin's dry run over a batch; `error` says why the batch could not even start."""

    twin: str
    batch_size: int
    memory: dict | None = None
    stats: SchedulerStats | None = None
    timeline: list[MemorySample] | None = None
    error: str | None = None
    waste: WasteBreakdown | None = None

    @property
    def fits_in_memory(self) -> bool:
        return self.error is None and self.stats is not None and self.stats.fits_in_memory


def dry_run(config: EngineConfig, budget_bytes: int, requests: list[Request], record_waste: bool = True) -> DryRun:
    """`requests` through the scheduler and block manager of `config`'s twin: greedy placeholder
    tokens to each request's length, recomputing what is preempted, no prefix caching.
    `record_waste`: also the four-way breakdown (a search for the largest batch needs none)."""
    config = replace(config, sampling=SamplingParams(), stop_ids=frozenset(), ignore_eos=True, preemption="recompute",
                     prefix_caching=False, cuda_graphs=False, tensor_parallel=SINGLE)
    try:
        engine = build_engine(config, budget_bytes, requests, record_waste=record_waste)
        engine.run(requests, progress=False)
    except OutOfKVMemory as e:
        return DryRun(config.twin, len(requests), error=str(e))
    return DryRun(config.twin, len(requests), engine.memory.summary(budget_bytes), engine.scheduler.stats,
                  engine.memory.timeline, waste=engine.waste)


def find_max_batch(config: EngineConfig, budget_bytes: int, requests: list[Request]) -> tuple[int, bool]:
    """Largest K such that the first K requests fit the KV memory (none waits for blocks, none is preempted).

    Returns (K, exhausted): `exhausted` means even all the requests given fit, so the true
    limit is at least K. Binary search: one more request never needs less memory.
    """
    def fits(k: int) -> bool:
        return k == 0 or dry_run(config, budget_bytes, requests[:k], record_waste=False).fits_in_memory

    if fits(len(requests)):
        return len(requests), True
    lo, hi = 0, len(requests)  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False

"""KV memory accounting and the report both twins print.

Words, used the same way everywhere (and in the vLLM paper):
- reserved: slots in blocks that some request owns (naive: whole preallocated rows);
- holding tokens: reserved slots that hold a token's K/V;
- fragmented: reserved but not holding a token (naive: the unused tail of each row;
  paged: the unused end of each request's last block). reserved = holding + fragmented;
- KV utilization: holding / reserved, at the moment of peak reservation.
GB means 2**30 bytes throughout, as nvidia-smi and PyTorch count. Shares in --json are
fractions (0.5 is half), printed as percents.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine.block_manager import KVCache

GB = 1 << 30


@dataclass(frozen=True)
class MemorySample:
    """One step, before its finished requests free their blocks: slots reserved and holding
    tokens; requests running and waiting (queued, or swapped out to CPU memory)."""

    reserved_tokens: int
    used_tokens: int
    running: int = 0
    waiting: int = 0

    @property
    def fragmented_tokens(self) -> int:
        return self.reserved_tokens - self.used_tokens


@dataclass
class MemoryTracker:
    """Reserved and used slots after every step; the peak is the step with most reserved."""

    cache: KVCache
    timeline: list[MemorySample] = field(default_factory=list)
    peak: MemorySample = MemorySample(0, 0)
    peak_blocks: int = 0

    def record(self, running: int, waiting: int) -> None:
        sample = MemorySample(self.cache.reserved_tokens, self.cache.num_cached_tokens, running, waiting)
        self.timeline.append(sample)
        if sample.reserved_tokens > self.peak.reserved_tokens:
            self.peak = sample
            self.peak_blocks = self.cache.allocator.num_used

    def summary(self, budget_bytes: int) -> dict:
        """The report's figures in bytes, as written to --json under "memory"."""
        slot = self.cache.bytes_per_slot
        end = self.timeline[-1] if self.timeline else MemorySample(0, 0)
        peak = self.peak
        return {
            "budget_bytes": budget_bytes,
            "pool_bytes": self.cache.capacity_tokens * slot,
            "block_size": self.cache.block_size,
            "num_blocks": self.cache.num_blocks,
            "peak_blocks_in_use": self.peak_blocks,
            "bytes_per_token": slot,
            "peak_reserved_bytes": peak.reserved_tokens * slot,
            "peak_used_bytes": peak.used_tokens * slot,
            "peak_fragmented_bytes": peak.fragmented_tokens * slot,
            "end_reserved_bytes": end.reserved_tokens * slot,
            "end_used_bytes": end.used_tokens * slot,
            "end_fragmented_bytes": end.fragmented_tokens * slot,
            "blocks_in_use_after": self.cache.allocator.num_used,
            "peak_utilization": peak.used_tokens / peak.reserved_tokens if peak.reserved_tokens else 0.0,
            "fragmented_fraction_of_budget": peak.fragmented_tokens * slot / budget_bytes if budget_bytes else 0.0,
        }


def timeline_json(timeline: list[MemorySample], bytes_per_slot: int) -> dict:
    """The per-step memory timeline as columns (one entry per step), for --json users to plot."""
    return {"reserved_bytes": [s.reserved_tokens * bytes_per_slot for s in timeline],
            "used_bytes": [s.used_tokens * bytes_per_slot for s in timeline],
            "running": [s.running for s in timeline], "waiting": [s.waiting for s in timeline]}


def human_bytes(n: float) -> str:
    for unit, size in (("GB", GB), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_memory_report(m: dict, title: str, interrupted: bool = False) -> str:
    """A readable table, ending with the classic `Fragmented Memory:` line (with the size in MB too
    when it is under 0.01 GB, which that line would print as 0.00 GB)."""
    budget = m["budget_bytes"]

    def pct(n: float) -> str:
        return f"{100 * n / budget:6.2f}% of budget" if budget else ""

    rows = [
        ("KV budget", human_bytes(budget), ""),
        ("pool", human_bytes(m["pool_bytes"]),
         f"{m['num_blocks']} blocks x {m['block_size']} slots x {human_bytes(m['bytes_per_token'])}/slot"),
        ("blocks in use at peak", f"{m['peak_blocks_in_use']}", f"of {m['num_blocks']}"),
        ("reserved at peak", human_bytes(m["peak_reserved_bytes"]), pct(m["peak_reserved_bytes"])),
        ("holding tokens at peak", human_bytes(m["peak_used_bytes"]), pct(m["peak_used_bytes"])),
        ("fragmented at peak", human_bytes(m["peak_fragmented_bytes"]), pct(m["peak_fragmented_bytes"])),
        ("KV utilization at peak", f"{100 * m['peak_utilization']:.1f}%", "holding / reserved"),
        ("reserved at last step", human_bytes(m["end_reserved_bytes"]), pct(m["end_reserved_bytes"])),
        ("holding tokens at last step", human_bytes(m["end_used_bytes"]), pct(m["end_used_bytes"])),
        ("fragmented at last step", human_bytes(m["end_fragmented_bytes"]), pct(m["end_fragmented_bytes"])),
        ("blocks in use after", f"{m['blocks_in_use_after']}",
         f"of {m['num_blocks']}: " + ("held by the requests interrupted mid-run" if interrupted
                                      else "finished requests free theirs")),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [title, "-" * len(title)]
    lines += [f"  {name:<{width}}  {value:>10}  {note}".rstrip() for name, value, note in rows]
    fragmented = m["peak_fragmented_bytes"]
    small = f" = {fragmented / (1 << 20):.2f} MB" if 0 < fragmented < GB / 100 else ""
    lines.append(f"Fragmented Memory: {fragmented / GB:.2f} GB ({100 * m['fragmented_fraction_of_budget']:.2f}%)"
                 f"{small}  [at peak, % of the KV budget]")
    return "\n".join(lines)

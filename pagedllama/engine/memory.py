"""KV memory accounting: slots reserved and holding tokens after every step, and the peak.

Words, used the same way everywhere (and in the vLLM paper):
- reserved: slots in blocks that some request owns (naive: whole preallocated rows);
- holding tokens: reserved slots that hold a token's K/V;
- fragmented: reserved but not holding a token (naive: the unused tail of each row;
  paged: the unused end of each request's last block). reserved = holding + fragmented;
- KV utilization: holding / reserved, at the moment of peak reservation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .block_manager import BlockManager


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

    block_manager: BlockManager
    bytes_per_slot: int
    timeline: list[MemorySample] = field(default_factory=list)
    peak: MemorySample = MemorySample(0, 0)
    peak_blocks: int = 0

    def record(self, running: int, waiting: int) -> None:
        sample = MemorySample(self.block_manager.reserved_tokens, self.block_manager.num_cached_tokens, running, waiting)
        self.timeline.append(sample)
        if sample.reserved_tokens > self.peak.reserved_tokens:
            self.peak = sample
            self.peak_blocks = self.block_manager.allocator.num_used

    def summary(self, budget_bytes: int) -> dict:
        """The report's figures in bytes, as written to --json under "memory"."""
        slot = self.bytes_per_slot
        end = self.timeline[-1] if self.timeline else MemorySample(0, 0)
        peak = self.peak
        return {
            "budget_bytes": budget_bytes,
            "pool_bytes": self.block_manager.capacity_tokens * slot,
            "block_size": self.block_manager.block_size,
            "num_blocks": self.block_manager.num_blocks,
            "peak_blocks_in_use": self.peak_blocks,
            "bytes_per_token": slot,
            "peak_reserved_bytes": peak.reserved_tokens * slot,
            "peak_used_bytes": peak.used_tokens * slot,
            "peak_fragmented_bytes": peak.fragmented_tokens * slot,
            "end_reserved_bytes": end.reserved_tokens * slot,
            "end_used_bytes": end.used_tokens * slot,
            "end_fragmented_bytes": end.fragmented_tokens * slot,
            "blocks_in_use_after": self.block_manager.allocator.num_used,
            "peak_utilization": peak.used_tokens / peak.reserved_tokens if peak.reserved_tokens else 0.0,
            "fragmented_fraction_of_budget": peak.fragmented_tokens * slot / budget_bytes if budget_bytes else 0.0,
        }

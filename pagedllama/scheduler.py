"""Continuous batching: which sequences run in the next step, and who waits.

Each step is either a prefill of newly admitted sequences or a decode step of all running
ones, never both (nano-vllm's choice: simple, and prefill steps stay large). Waiting
sequences are admitted first-come first-served whenever the pool has blocks for their
prompt plus a small watermark. When decode needs a block and none is free, the most
recently admitted sequence is preempted: its blocks are freed and it goes back to the
front of the queue with its generated tokens, to be recomputed by a later prefill.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .kv_cache import KVCache
from .sequence import Sequence, Status


@dataclass
class SchedulerStats:
    peak_running: int = 0
    preemptions: int = 0
    num_requests: int = 0

    @property
    def all_resident(self) -> bool:
        """Was every request in the cache at the same time (none waited for memory)?"""
        return self.peak_running == self.num_requests and self.preemptions == 0


class Scheduler:
    def __init__(self, cache: KVCache, max_prefill_tokens: int = 16384, watermark: float = 0.01):
        self.cache = cache
        self.max_prefill_tokens = max_prefill_tokens
        self.watermark_blocks = int(watermark * cache.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.stats.num_requests += 1

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step and whether it is a prefill step."""
        admitted = self._admit()
        if admitted:
            return admitted, True
        if not self.running:
            seq = self.waiting[0]
            raise MemoryError(f"request {seq.request_id} needs {seq.num_tokens} KV slots but the whole "
                              f"pool holds {self.cache.capacity_tokens}")
        return self._reserve_decode_slots(), False

    def _admit(self) -> list[Sequence]:
        admitted, tokens = [], 0
        # The watermark keeps a little room for running sequences to grow, but never blocks
        # a request when nothing else is running.
        while self.waiting:
            seq = self.waiting[0]
            watermark = self.watermark_blocks if self.running or admitted else 0
            if tokens and tokens + seq.num_tokens > self.max_prefill_tokens:
                break
            if not self.cache.can_allocate(seq, watermark):
                break
            self.waiting.popleft()
            self.cache.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            tokens += seq.num_tokens
        self.stats.peak_running = max(self.stats.peak_running, len(self.running))
        return admitted

    def _reserve_decode_slots(self) -> list[Sequence]:
        """Make sure every running sequence has a slot for its next token, preempting if needed."""
        scheduled = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            while not self.cache.can_grow(seq, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.cache.grow(seq, seq.num_tokens)
                scheduled.append(seq)
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        self.cache.free(seq)

"""Continuous batching: which sequences run in the next step, and who waits.

Each step is either a prefill of newly admitted sequences or a decode step of all running
ones, never both (nano-vllm's choice: simple, and prefill steps stay large). The unit of
scheduling is a request's group of sequences (its samples or beams), admitted, preempted
and resumed together. Waiting requests are admitted first-come first-served whenever the
pool has blocks for their tokens plus a small watermark, up to `MAX_PREFILL_TOKENS` prompt
tokens per step (a request still queued when that budget is spent waits for the next prefill
step, not for memory). When decode needs a block and
none is free, the most recently admitted request is preempted: its K/V are either
swapped to a CPU pool, to be copied back before anything new is admitted, or freed, the
request going back to the front of the queue with its generated tokens to be recomputed
by a later prefill (its samples or beams then share their common prefix again). Swapping
falls back to recompute when the CPU pool is full.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .config import MAX_PREFILL_TOKENS
from .sequence import Sequence, SequenceGroup, Status
from .swap import SwapSpace


@dataclass
class SchedulerStats:
    peak_running: int = 0  # requests running at once
    preemptions: int = 0
    waited_for_memory: int = 0  # requests that sat in the queue while admission stopped for lack of KV blocks
    num_requests: int = 0
    swaps: int = 0  # preemptions that swapped to CPU memory
    swap_fallbacks: int = 0  # preemptions that would have swapped but found the CPU pool full

    @property
    def fits_in_memory(self) -> bool:
        """The batch fit its KV memory: no request waited for blocks and none was preempted.

        Waiting for a later prefill step (the prefill token budget) does not count, nor does a
        request finishing before the last one is admitted: neither is a lack of memory.
        """
        return self.waited_for_memory == 0 and self.preemptions == 0


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_prefill_tokens: int = MAX_PREFILL_TOKENS,
                 watermark: float = 0.01, swap: SwapSpace | None = None):
        """`swap`: where preempted requests go; None preempts by recompute."""
        self.block_manager = block_manager
        self.max_prefill_tokens = max_prefill_tokens
        # The watermark keeps room for running sequences to grow into new blocks; a sequence whose
        # slots are all reserved at admission (the naive twin) never does.
        grows = not block_manager.layout.reserves_at_admission
        self.watermark_blocks = int(watermark * block_manager.num_blocks) if grows else 0
        self.swap = swap
        self.waiting: deque[SequenceGroup] = deque()
        self.running_groups: list[SequenceGroup] = []  # in admission order
        self.swapped: deque[SequenceGroup] = deque()
        self.seq_ids = itertools.count()
        self.stats = SchedulerStats()
        self.memory_stalls = 0  # steps at which admission stopped for lack of KV blocks

    def add(self, group: SequenceGroup) -> None:
        group.stalls_seen = self.memory_stalls
        self.waiting.append(group)
        self.stats.num_requests += 1

    @property
    def running(self) -> list[Sequence]:
        return [s for g in self.running_groups for s in g.seqs]

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running_groups and not self.swapped

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step and whether it is a prefill step."""
        self._swap_in()
        if self.swapped and self.waiting:  # queued behind requests waiting for memory to swap back in
            self.memory_stalls += 1
        admitted = [] if self.swapped else self._admit()
        self.stats.peak_running = max(self.stats.peak_running, len(self.running_groups))
        if admitted:
            return admitted, True
        if not self.running_groups:
            group = (self.swapped or self.waiting)[0]
            slots = group.reserve_slots or sum(s.num_tokens for s in group.seqs)
            raise MemoryError(f"request {group.request_id} needs {slots} KV slots "
                              f"but the whole pool holds {self.block_manager.capacity_tokens}")
        return self._reserve_decode_slots(), False

    def _watermark(self) -> int:
        """The watermark keeps a little room for running sequences to grow, but never blocks
        a request when nothing else is running."""
        return self.watermark_blocks if self.running_groups else 0

    def _swap_in(self) -> None:
        while self.swapped and self.swap.can_swap_in(self.swapped[0].seqs, self._watermark()):
            group = self.swapped.popleft()
            self.swap.swap_in(group.seqs)
            self._run(group)

    def _admit(self) -> list[Sequence]:
        admitted, tokens = [], 0
        while self.waiting:
            group = self.waiting[0]
            group_tokens = sum(s.num_tokens for s in group.seqs)
            if tokens and tokens + group_tokens > self.max_prefill_tokens:
                break
            if not self.block_manager.can_allocate(*group.seqs, watermark_blocks=self._watermark()):
                self.memory_stalls += 1
                break
            self.waiting.popleft()
            if group.stalls_seen != self.memory_stalls and not group.waited_for_memory:
                group.waited_for_memory = True  # it was queued when admission stopped for memory
                self.stats.waited_for_memory += 1
            for i, seq in enumerate(group.seqs):
                self.block_manager.allocate(seq, tuple(group.seqs[:i]))
            self._run(group)
            admitted += group.seqs
            tokens += group_tokens
        return admitted

    def _run(self, group: SequenceGroup) -> None:
        for seq in group.seqs:
            seq.status = Status.RUNNING
        self.running_groups.append(group)

    def _reserve_decode_slots(self) -> list[Sequence]:
        """Make sure every running sequence has a slot for its next token, preempting if needed."""
        running = self.running
        if self.block_manager.grow_all(running):  # the common step: room for everyone, no preemption
            return running
        scheduled = []
        for group in list(self.running_groups):
            if group.seqs[0].status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            while self.block_manager.blocks_to_grow(group.seqs) > self.block_manager.allocator.num_free:
                victim = self.running_groups[-1]
                if victim is group and len(self.running_groups) == 1:
                    raise MemoryError(f"request {group.request_id}'s {len(group.seqs)} sequences outgrow the whole "
                                      f"pool of {self.block_manager.capacity_tokens} KV slots")
                self.preempt(victim)
                if victim is group:
                    break
            if group.seqs[0].status is Status.RUNNING:
                for seq in group.seqs:
                    self.block_manager.grow(seq, seq.num_tokens)
                scheduled += group.seqs
        return scheduled

    def preempt(self, group: SequenceGroup) -> None:
        """Take a running request out of the cache: swapped out if there is room, else to be recomputed."""
        self.running_groups.remove(group)
        self.stats.preemptions += 1
        for seq in group.seqs:
            seq.num_preemptions += 1
        if self.swap is not None and self.swap.can_swap_out(group.seqs):
            self.swap.swap_out(group.seqs)
            for seq in group.seqs:
                seq.status = Status.SWAPPED
            self.swapped.appendleft(group)
            self.stats.swaps += 1
            return
        if self.swap is not None:
            self.stats.swap_fallbacks += 1
        for seq in group.seqs:
            self.block_manager.free(seq)
            seq.status = Status.WAITING
        group.stalls_seen = self.memory_stalls
        self.waiting.appendleft(group)

    def fork(self, parent: Sequence, sample_key: int) -> Sequence:
        """A new running sequence of `parent`'s request, sharing all its blocks."""
        child = parent.fork(next(self.seq_ids), sample_key)
        self.block_manager.fork(parent, child)
        parent.group.seqs.append(child)
        return child

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self._retire(seq)
        seq.group.finished.append(seq)

    def prune(self, seq: Sequence) -> None:
        """Drop a beam that no longer ranks: its blocks go back, it is no output."""
        seq.finish_reason = "pruned"
        self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        group = seq.group
        group.seqs.remove(seq)
        self.block_manager.free(seq)
        if not group.seqs:
            self.running_groups.remove(group)

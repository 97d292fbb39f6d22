"""The pool of physical KV blocks: which are free, and how many tables point at each."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .contiguous_allocator import ContiguousAllocator
from .waste import WasteRecorder


class BlockAllocator:
    """Hands out physical block ids from a fixed pool.

    A block is free when no block table references it. Reference counts are what lets
    several sequences share a block (forked samples, a common prefix); a plain request
    holds each of its blocks once. Free blocks are handed out in the order they were freed,
    so a freed block that still holds a cached prefix is overwritten as late as possible
    (least recently used first).

    `contiguous`: blocks are handed out only as runs of consecutive ids (`allocate_run`), first fit,
    from a `ContiguousAllocator` counting in blocks, and a run goes back whole (`free_run`).
    `recorder`: told when each block (or run) is taken and when it goes back, for the waste trace.
    """

    def __init__(self, num_blocks: int, contiguous: bool = False, block_slots: int = 1,
                 recorder: WasteRecorder | None = None):
        """`block_slots`: the slots of one block, for `recorder` (which counts in slots)."""
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.num_refs = 0  # sum of ref_counts: the block-table entries pointing into the pool
        self.runs = ContiguousAllocator(num_blocks) if contiguous and num_blocks else None
        self._free: deque[int] = deque() if contiguous else deque(range(num_blocks))
        self.block_slots = block_slots
        self.recorder = recorder

    @property
    def num_free(self) -> int:
        return self.runs.free_slots if self.runs else len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        assert self.runs is None, "a contiguous pool hands out runs (allocate_run)"
        if not self._free:
            raise RuntimeError("no free KV block")  # callers check num_free first
        block = self._free.popleft()
        self.ref_counts[block] = 1
        self.num_refs += 1
        if self.recorder:
            self.recorder.allocate(block, self.block_slots)
        return block

    def allocate_run(self, n: int) -> int | None:
        """The first block of `n` consecutive free ones (the lowest such run), or None when no hole holds `n`."""
        first = self.runs.allocate(n)
        if first is not None:
            self.ref_counts[first:first + n] = [1] * n
            self.num_refs += n
            if self.recorder:
                self.recorder.allocate(first, n * self.block_slots)
        return first

    def free_run(self, first: int, n: int) -> None:
        """Give back the run of `n` blocks starting at `first`, held once (a contiguous pool shares nothing)."""
        assert self.ref_counts[first:first + n] == [1] * n, f"the run at block {first} is not held once"
        self.ref_counts[first:first + n] = [0] * n
        self.num_refs -= n
        self.runs.free(first)
        if self.recorder:
            self.recorder.free(first)

    def reuse(self, block: int) -> None:
        """Take one particular free block back: it still holds a cached prefix that is wanted again."""
        assert self.ref_counts[block] == 0, f"reusing block {block}, which is in use"
        self._free.remove(block)
        self.ref_counts[block] = 1
        self.num_refs += 1
        if self.recorder:
            self.recorder.allocate(block, self.block_slots)

    def share(self, block: int) -> None:
        """One more table points at `block`."""
        assert self.ref_counts[block] > 0, f"sharing free block {block}"
        self.ref_counts[block] += 1
        self.num_refs += 1

    def free(self, block: int) -> None:
        """One table lets go of `block`; it returns to the pool when none hold it."""
        assert self.ref_counts[block] > 0, f"double free of block {block}"
        assert self.runs is None, "a contiguous pool takes runs back whole (free_run)"
        self.ref_counts[block] -= 1
        self.num_refs -= 1
        if self.ref_counts[block] == 0:
            self._free.append(block)
            if self.recorder:
                self.recorder.free(block)

    def mirror(self, tables: list[list[int]], new_block: Callable[[], int] | None = None) -> list[list[int]]:
        """The same tables in this pool, for block ids of another pool (swapping).

        Each distinct id there gets one block here, held as many times as it appears, so
        blocks the tables share stay shared.
        """
        placed: dict[int, int] = {}
        mirrored = []
        for table in tables:
            for other in table:
                if other in placed:
                    self.share(placed[other])
                else:
                    placed[other] = (new_block or self.allocate)()
            mirrored.append([placed[other] for other in table])
        return mirrored

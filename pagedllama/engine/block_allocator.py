"""The pool of physical KV blocks: which are free, and how many tables point at each."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable


class BlockAllocator:
    """Hands out physical block ids from a fixed pool.

    A block is free when no block table references it. Reference counts are what lets
    several sequences share a block (forked samples, a common prefix); a plain request
    holds each of its blocks once. Free blocks are handed out in the order they were freed,
    so a freed block that still holds a cached prefix is overwritten as late as possible
    (least recently used first).
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.num_refs = 0  # sum of ref_counts: the block-table entries pointing into the pool
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV block")  # callers check num_free first
        block = self._free.popleft()
        self.ref_counts[block] = 1
        self.num_refs += 1
        return block

    def reuse(self, block: int) -> None:
        """Take one particular free block back: it still holds a cached prefix that is wanted again."""
        assert self.ref_counts[block] == 0, f"reusing block {block}, which is in use"
        self._free.remove(block)
        self.ref_counts[block] = 1
        self.num_refs += 1

    def share(self, block: int) -> None:
        """One more table points at `block`."""
        assert self.ref_counts[block] > 0, f"sharing free block {block}"
        self.ref_counts[block] += 1
        self.num_refs += 1

    def free(self, block: int) -> None:
        """One table lets go of `block`; it returns to the pool when none hold it."""
        assert self.ref_counts[block] > 0, f"double free of block {block}"
        self.ref_counts[block] -= 1
        self.num_refs -= 1
        if self.ref_counts[block] == 0:
            self._free.append(block)

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

"""Variable-size contiguous reservations in one flat region of KV slots: the pre-paging memory manager.

Each request owns one range [offset, offset + n) of a region shared by all layers (slot s of every
layer belongs to the same request). Ranges of different sizes come and go, so free memory splits
into holes: a request can fit in the total free memory and still in no single hole. That is the
vLLM paper's external fragmentation (section 3.1), which fixed-size pages cannot have.

First fit, in address order: a request takes the lowest hole large enough. Why:
- simplicity: one scan of a sorted hole list, no size classes, nothing to tune;
- fragmentation: address-ordered first fit fragments about as little as best fit on real traces
  (Wilson et al., "Dynamic Storage Allocation: A Survey and Critical Review", 1995), without best
  fit's habit of leaving slivers too small for anything;
- the paper's own Orca assumes a buddy allocator, which rounds every range up to a power of two:
  that adds its own internal fragmentation on top of the policy's and would blur which policy
  wastes what, so this allocator places exactly the size asked for.
Every call is O(number of holes), which stays small (at most one more than the live requests).
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable


class ContiguousAllocator:
    """Hands out contiguous slot ranges of a region of `num_slots` slots, first fit."""

    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"a contiguous region needs at least one slot, not {num_slots}")
        self.num_slots = num_slots
        self.holes: list[tuple[int, int]] = [(0, num_slots)]  # (offset, length), sorted, never adjacent
        self._ranges: dict[int, int] = {}  # offset -> length of each live reservation
        self.free_slots = num_slots

    @property
    def largest_hole(self) -> int:
        return max((length for _, length in self.holes), default=0)

    def allocate(self, n: int) -> int | None:
        """The offset of a new range of `n` slots, or None when no hole holds `n` (the caller waits)."""
        if n < 1:
            raise ValueError(f"a reservation needs at least one slot, not {n}")
        for i, (offset, length) in enumerate(self.holes):
            if length >= n:
                if length == n:
                    del self.holes[i]
                else:
                    self.holes[i] = (offset + n, length - n)
                self._ranges[offset] = n
                self.free_slots -= n
                return offset
        return None

    def free(self, offset: int) -> None:
        """Give back the range at `offset`, merging it with the holes on either side."""
        length = self._ranges.pop(offset, None)
        if length is None:
            raise ValueError(f"no reservation starts at slot {offset}")
        self.free_slots += length
        i = bisect_left(self.holes, (offset, 0))
        end = offset + length
        if i < len(self.holes) and self.holes[i][0] == end:  # the hole after it
            end += self.holes.pop(i)[1]
        if i > 0 and sum(self.holes[i - 1]) == offset:  # the hole before it
            offset = self.holes[i - 1][0]
            self.holes[i - 1] = (offset, end - offset)
        else:
            self.holes.insert(i, (offset, end - offset))

    def external_fragmentation(self, waiting: Iterable[int]) -> int:
        """Free slots lost to fragmentation now: all of them when one of the `waiting` reservation
        sizes fits in the total free memory but in no hole, else 0."""
        largest = self.largest_hole
        return self.free_slots if any(largest < n <= self.free_slots for n in waiting) else 0

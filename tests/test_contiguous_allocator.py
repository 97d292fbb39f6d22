"""The contiguous allocator: first fit, holes merged, external fragmentation; invariants with hypothesis."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllama.engine.contiguous_allocator import ContiguousAllocator


def test_first_fit_takes_the_lowest_hole_large_enough():
    a = ContiguousAllocator(20)
    assert [a.allocate(n) for n in (4, 3, 5, 2)] == [0, 4, 7, 12]
    a.free(0)  # hole [0, 4)
    a.free(7)  # hole [7, 12)
    assert a.holes == [(0, 4), (7, 5), (14, 6)]
    assert a.allocate(5) == 7  # not the larger hole at 14: first fit
    assert a.allocate(4) == 0
    assert a.holes == [(14, 6)]
    assert a.free_slots == 6 and a.largest_hole == 6


def test_a_hole_that_fits_no_request():
    a = ContiguousAllocator(10)
    assert [a.allocate(n) for n in (4, 3, 3)] == [0, 4, 7]
    a.free(0)
    a.free(7)
    assert a.holes == [(0, 4), (7, 3)] and a.free_slots == 7
    assert a.allocate(5) is None  # 7 slots free, but no hole holds 5
    assert a.holes == [(0, 4), (7, 3)] and a.free_slots == 7  # a refusal changes nothing
    assert a.external_fragmentation([5]) == 7  # all free memory is stranded
    assert a.external_fragmentation([4]) == 0  # fits the first hole
    assert a.external_fragmentation([8]) == 0  # does not fit even in all free memory: no fragmentation
    assert a.external_fragmentation([8, 5]) == 7
    assert a.external_fragmentation([]) == 0
    a.free(4)  # the middle range joins both holes
    assert a.holes == [(0, 10)]
    assert a.allocate(5) == 0


@pytest.mark.parametrize("order, holes_after_first", [
    ((0, 4, 8), [(0, 4)]),  # merges with nothing, then with the hole before it, then both
    ((8, 4, 0), [(8, 4)]),  # merges with the hole after it (the tail), then on
    ((4, 0, 8), [(4, 4)]),
])
def test_neighbours_merge(order, holes_after_first):
    a = ContiguousAllocator(12)
    assert [a.allocate(4) for _ in range(3)] == [0, 4, 8]
    a.free(order[0])
    assert a.holes == holes_after_first
    a.free(order[1])
    a.free(order[2])
    assert a.holes == [(0, 12)] and a.free_slots == 12


def test_whole_region_and_refusal_when_full():
    a = ContiguousAllocator(5)
    assert a.allocate(6) is None
    assert a.allocate(5) == 0
    assert a.holes == [] and a.largest_hole == 0 and a.free_slots == 0
    assert a.allocate(1) is None


def test_bad_calls():
    a = ContiguousAllocator(8)
    with pytest.raises(ValueError, match="at least one slot"):
        a.allocate(0)
    offset = a.allocate(3)
    with pytest.raises(ValueError, match="no reservation starts at slot 1"):
        a.free(1)
    a.free(offset)
    with pytest.raises(ValueError, match="no reservation starts at slot 0"):
        a.free(offset)  # a double free
    with pytest.raises(ValueError, match="at least one slot"):
        ContiguousAllocator(0)


def free_runs(owner: list[int | None]) -> list[tuple[int, int]]:
    """The model's holes: maximal runs of free slots, in address order."""
    runs, start = [], None
    for i, o in enumerate([*owner, 0]):  # a sentinel closes the last run
        if o is None and start is None:
            start = i
        elif o is not None and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


ops = st.lists(st.tuples(st.booleans(), st.integers(1, 24), st.integers(0, 1000)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(num_slots=st.integers(1, 64), ops=ops)
def test_matches_a_slot_array(num_slots, ops):
    """Random allocates and frees against a model that owns each slot: first fit, no overlap,
    holes exactly the runs of free slots (so sorted and merged), everything back at the end."""
    a = ContiguousAllocator(num_slots)
    owner: list[int | None] = [None] * num_slots  # the offset of the range holding each slot
    live: dict[int, int] = {}
    for alloc, n, pick in ops:
        if alloc or not live:
            fits = [off for off, length in free_runs(owner) if length >= n]
            offset = a.allocate(n)
            assert offset == (fits[0] if fits else None)
            if offset is not None:
                assert 0 <= offset and offset + n <= num_slots
                assert all(o is None for o in owner[offset:offset + n]), "overlapping ranges"
                owner[offset:offset + n] = [offset] * n
                live[offset] = n
        else:
            offset = sorted(live)[pick % len(live)]
            a.free(offset)
            length = live.pop(offset)
            owner[offset:offset + length] = [None] * length
        runs = free_runs(owner)
        assert a.holes == runs
        assert all(o1 + l1 < o2 for (o1, l1), (o2, _) in zip(a.holes, a.holes[1:])), "adjacent holes not merged"
        assert a.free_slots == owner.count(None) == sum(length for _, length in runs)
        assert a.largest_hole == max((length for _, length in runs), default=0)
        stranded = a.free_slots if a.largest_hole < n <= a.free_slots else 0
        assert a.external_fragmentation([n]) == stranded
    for offset in list(live):
        a.free(offset)
    assert a.holes == [(0, num_slots)] and a.free_slots == num_slots

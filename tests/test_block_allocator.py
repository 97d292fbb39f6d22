"""Block allocator and cache bookkeeping invariants, with hypothesis."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllama.engine.block_allocator import BlockAllocator
from pagedllama.engine.block_manager import BlockManager
from pagedllama.engine.config import CacheLayout
from pagedllama.engine.sequence import Sequence, SequenceGroup
from pagedllama.engine.waste import WasteRecorder


def check_invariants(cache: BlockManager, live: list[Sequence]) -> None:
    owned = [b for s in live for b in s.block_table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert cache.allocator.num_used == len(owned)
    assert cache.allocator.num_free + cache.allocator.num_used == cache.num_blocks
    assert cache.allocator.num_refs == sum(cache.allocator.ref_counts)
    for s in live:
        reserved = len(s.block_table) * cache.block_size
        assert 0 <= reserved - s.num_tokens < cache.block_size, "more than one partly filled block"
        assert cache.block_tables[s.row, :len(s.block_table)].tolist() == s.block_table


ops = st.lists(st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 30), st.integers(1, 40)),
               max_size=60)


@settings(max_examples=150, deadline=None)
@given(block_size=st.sampled_from([1, 2, 16, 64]), num_blocks=st.integers(1, 80), ops=ops)
def test_allocator_invariants(block_size, num_blocks, ops):
    cache = BlockManager(CacheLayout(block_size, num_blocks), 1024, 8)
    live: list[Sequence] = []
    for i, (op, pick, n) in enumerate(ops):
        if op == "admit" and len(live) < 8:
            seq = Sequence(i, str(i), [0] * n, n, 10)
            if cache.can_allocate(seq):
                cache.allocate(seq)
                live.append(seq)
        elif op == "grow" and live:
            seq = live[pick % len(live)]
            seq.token_ids += [0] * n
            if seq.num_tokens <= 1024 and cache.blocks_to_grow([seq]) <= cache.allocator.num_free:
                cache.grow(seq, seq.num_tokens)
            else:
                del seq.token_ids[-n:]
        elif op == "free" and live:
            cache.free(live.pop(pick % len(live)))
        check_invariants(cache, live)
    for seq in live:
        cache.free(seq)
    assert cache.allocator.num_free == num_blocks, "blocks leaked after every request ended"
    assert cache.num_cached_tokens == 0


def test_allocator_refuses_what_would_corrupt_its_counts():
    """Callers check `num_free` first and free only what they hold; when they do not, the allocator
    says so rather than hand out a block twice or let a count go negative."""
    pool = BlockAllocator(2)
    held = [pool.allocate(), pool.allocate()]
    with pytest.raises(RuntimeError, match="^no free KV block$"):
        pool.allocate()
    pool.free(held[0])
    with pytest.raises(AssertionError, match=f"double free of block {held[0]}"):
        pool.free(held[0])
    with pytest.raises(AssertionError, match=f"sharing free block {held[0]}"):
        pool.share(held[0])
    pool.reuse(held[0])
    with pytest.raises(AssertionError, match=f"reusing block {held[0]}, which is in use"):
        pool.reuse(held[0])
    assert pool.ref_counts == [1, 1] and pool.num_refs == 2 and pool.num_free == 0


def test_a_contiguous_pool_hands_out_and_takes_back_whole_runs_only():
    """The naive twin's pool: runs of consecutive blocks, first fit, each held once and given back
    whole; single blocks are refused. The waste trace sees each run as one unit of its slots."""
    recorder = WasteRecorder(6 * 4, 1, 6)
    pool = BlockAllocator(6, contiguous=True, block_slots=4, recorder=recorder)
    assert pool.allocate_run(4) == 0 and pool.allocate_run(3) is None and pool.allocate_run(2) == 4
    assert pool.ref_counts == [1] * 6 and pool.num_refs == 6 and pool.num_free == 0
    recorder.step([0, 4], [5, 1], 0)  # units of 16 and 8 slots live: the budget
    with pytest.raises(AssertionError, match=r"^a contiguous pool hands out runs \(allocate_run\)$"):
        pool.allocate()
    with pytest.raises(AssertionError, match=r"^a contiguous pool takes runs back whole \(free_run\)$"):
        pool.free(0)
    pool.free_run(0, 4)
    with pytest.raises(AssertionError, match="^the run at block 0 is not held once$"):
        pool.free_run(0, 4)
    pool.free_run(4, 2)
    assert pool.ref_counts == [0] * 6 and pool.num_refs == 0 and pool.num_free == 6
    recorder.step([], [], 24)
    assert pool.allocate_run(6) == 0


def test_a_reused_block_is_a_new_unit_of_the_waste_trace():
    """A freed block taken back for its cached prefix starts a new lifetime of its slots."""
    recorder = WasteRecorder(2 * 4, 1, 2)
    pool = BlockAllocator(2, block_slots=4, recorder=recorder)
    block = pool.allocate()
    pool.free(block)
    recorder.step([], [], 8)
    pool.reuse(block)
    other = pool.allocate()
    recorder.step([block, other], [4, 1], 0)


def test_recomputed_samples_share_their_full_common_blocks_again():
    """Two samples of 9 tokens, admitted together after a preemption: the first 2 blocks of 4
    (never the block of the last token, whose logits the prefill is for) are held once. A request
    that needs every free block fits (no watermark unless asked)."""
    cache = BlockManager(CacheLayout(4, 4), 64, 4)
    first, second = (Sequence(i, "r", list(range(9)), 9, 4) for i in range(2))
    assert cache.can_allocate(first, second) and not cache.can_allocate(first, second, watermark_blocks=1)
    cache.allocate(first)
    cache.allocate(second, (first,))
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert cache.allocator.num_free == 0


def _state(cache: BlockManager, seqs: list[Sequence]):
    return ([list(s.block_table) for s in seqs], list(cache.allocator.ref_counts), cache.allocator.num_free,
            cache.num_cached_tokens, cache.block_tables.copy().tolist())


@settings(max_examples=100, deadline=None)
@given(block_size=st.sampled_from([1, 4, 16]), num_blocks=st.integers(4, 40),
       prompts=st.lists(st.integers(1, 40), min_size=1, max_size=4), forks=st.lists(st.integers(0, 3), max_size=4),
       steps=st.lists(st.lists(st.integers(0, 20), min_size=1, max_size=8), min_size=1, max_size=12))
def test_grow_all_matches_growing_one_by_one(block_size, num_blocks, prompts, forks, steps):
    """The scheduler's one-pass decode growth does what checking the whole batch and then growing
    each sequence did, shared (forked) blocks included, and changes nothing when it refuses."""
    def build():
        cache = BlockManager(CacheLayout(block_size, num_blocks), 1024, 16)
        seqs = []
        for i, n in enumerate(prompts):
            seq = Sequence(i, str(i), [0] * n, n, 10)
            if cache.can_allocate(seq):
                cache.allocate(seq)
                cache.commit([seq], is_prefill=True)
                seqs.append(seq)
        for j, parent in enumerate(forks):
            if seqs:
                child = seqs[parent % len(seqs)].fork(100 + j, 0)
                cache.fork(seqs[parent % len(seqs)], child)
                seqs.append(child)
        return cache, seqs

    fast, fast_seqs = build()
    slow, slow_seqs = build()
    for picks in steps:
        chosen = sorted({p % len(fast_seqs) for p in picks}) if fast_seqs else []
        for seqs in (fast_seqs, slow_seqs):
            for i in chosen:
                seqs[i].token_ids.append(1)
        batch = [fast_seqs[i] for i in chosen]
        before = _state(fast, batch)
        grown = fast.grow_all(batch)
        expected = slow.blocks_to_grow([slow_seqs[i] for i in chosen]) <= slow.allocator.num_free
        assert grown == expected
        if not grown:
            assert _state(fast, batch) == before
            for seqs in (fast_seqs, slow_seqs):
                for i in chosen:
                    seqs[i].token_ids.pop()
            continue
        for i in chosen:
            slow.grow(slow_seqs[i], slow_seqs[i].num_tokens)
        fast.commit(batch, is_prefill=False)
        slow.commit([slow_seqs[i] for i in chosen], is_prefill=False)
        assert _state(fast, fast_seqs) == _state(slow, slow_seqs)


def test_recomputed_samples_share_no_block_that_differs_or_is_not_full():
    """Samples of a 2-token prompt, blocks of 4: one whose first block's generated tokens differ,
    and one shorter than a full block and its last token, share nothing with their sibling."""
    cache = BlockManager(CacheLayout(4, 8), 64, 4)
    for first, second in (([0, 1, 2, 3, 4, 5, 6], [0, 1, 7, 3, 4, 5, 6]), ([0, 1, 2, 3], [0, 1, 2, 3])):
        seqs = [Sequence(i, "r", tokens, 2, 8) for i, tokens in enumerate((first, second))]
        cache.allocate(seqs[0])
        cache.allocate(seqs[1], (seqs[0],))
        assert not set(seqs[0].block_table) & set(seqs[1].block_table) and seqs[1].num_cached_tokens == 0
        for seq in seqs:
            cache.free(seq)


def test_a_reservation_is_allocated_only_after_can_allocate():
    """The contiguous pool's guard: a request admitted without room is a bug in the caller, said so."""
    cache = BlockManager(CacheLayout(4, 4, contiguous=True), 64, 4)
    seqs = [Sequence(i, str(i), [0] * 4, 4, 4) for i in range(2)]
    for seq in seqs:
        seq.group = SequenceGroup(seq.request_id, [seq], reserve_slots=12)  # 3 of the 4 blocks
    assert cache.can_allocate(seqs[0])
    cache.allocate(seqs[0])
    assert not cache.can_allocate(seqs[1])
    with pytest.raises(AssertionError, match="^allocate a reservation only after can_allocate$"):
        cache.allocate(seqs[1])

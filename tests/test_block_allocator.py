"""Block allocator and cache bookkeeping invariants, with hypothesis."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CPU, TINY
from pagedllama.attention import TorchAttention
from pagedllama.kv_cache import KVCache
from pagedllama.sequence import Sequence

import torch


def check_invariants(cache: KVCache, live: list[Sequence]) -> None:
    owned = [b for s in live for b in s.block_table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert cache.allocator.num_used == len(owned)
    assert cache.allocator.num_free + cache.allocator.num_used == cache.num_blocks
    for s in live:
        reserved = len(s.block_table) * cache.block_size
        assert 0 <= reserved - s.num_tokens < cache.block_size, "more than one partly filled block"
        assert cache.host_block_tables[s.row, :len(s.block_table)].tolist() == s.block_table


ops = st.lists(st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 30), st.integers(1, 40)),
               max_size=60)


@settings(max_examples=150, deadline=None)
@given(block_size=st.sampled_from([1, 2, 16, 64]), num_blocks=st.integers(1, 80), ops=ops)
def test_allocator_invariants(block_size, num_blocks, ops):
    cache = KVCache(TINY, num_blocks, block_size, 1024, 8, TorchAttention(), CPU, torch.float32)
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

"""Allocator, cache and scheduler driven by random admit / step / fork / finish / preempt sequences.

After every rule the bookkeeping must agree with itself: reference counts with the block
tables that hold each block, free plus used with the pool, the swap pool with the swapped
tables, the count of slots holding tokens with the tables. When the cache has storage, each
step writes its tokens' ids where a model would write their K, so that copies on write,
swaps and reused prefix blocks can be checked by content too.
"""
from __future__ import annotations

from collections import Counter

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import CPU, TINY
from pagedllama.engine.block_manager import BlockManager, cdiv
from pagedllama.engine.config import CacheLayout
from pagedllama.engine.prefix_cache import ROOT
from pagedllama.engine.scheduler import Scheduler
from pagedllama.engine.sequence import Sequence, SequenceGroup, Status
from pagedllama.engine.swap import SwapSpace
from pagedllama.model.kv_cache import KVCache

MAX_PROMPT, MAX_NEW, MAX_WIDTH, ROWS = 10, 8, 3, 12


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 4]), extra_blocks=st.integers(0, 12),
                swap_blocks=st.sampled_from([None, 3, 1000]), prefix_caching=st.booleans(), storage=st.booleans())
    def setup(self, block_size, extra_blocks, swap_blocks, prefix_caching, storage):
        # A request alone always fits, even with its samples as full copies: no MemoryError.
        num_blocks = MAX_WIDTH * cdiv(MAX_PROMPT + MAX_NEW, block_size) + extra_blocks
        self.cache = BlockManager(CacheLayout(block_size, num_blocks), 64, ROWS)
        # the KV tensors a model runner would hold, the copies and swaps applied to them as it does
        self.kv = KVCache(TINY, self.cache.layout, None, CPU, torch.float32, swap_blocks or 0) if storage else None
        if prefix_caching:
            self.cache.enable_prefix_caching()
        swap = None if swap_blocks is None else SwapSpace(self.cache, swap_blocks)
        self.scheduler = Scheduler(self.cache, watermark=0, swap=swap)
        self.groups: list[SequenceGroup] = []

    # ---- rules ---------------------------------------------------------------------------
    @precondition(lambda self: sum(len(g.seqs) for g in self.groups) < ROWS)
    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=MAX_PROMPT), max_new=st.integers(1, MAX_NEW))
    def add_request(self, prompt, max_new):
        """Few distinct token ids, so that prompts often share prefixes."""
        seq = Sequence(next(self.scheduler.seq_ids), f"r{len(self.groups)}", prompt, len(prompt), max_new)
        seq.group = SequenceGroup(seq.request_id, [seq])
        self.scheduler.add(seq.group)
        self.groups.append(seq.group)

    @precondition(lambda self: not self.scheduler.done)
    @rule(tokens=st.lists(st.integers(0, 2), min_size=ROWS, max_size=ROWS))
    def step(self, tokens):
        """Each sequence gets its own next token, so forked ones diverge."""
        batch, is_prefill = self.scheduler.schedule()
        ops = self.cache.take_ops()
        if self.kv:
            self.kv.apply(ops)
        starts = [s.num_cached_tokens if is_prefill else s.num_tokens - 1 for s in batch]
        self.cache.commit(batch, is_prefill)
        for seq, start, token in zip(batch, starts, tokens):
            self._write(seq, start)
            seq.token_ids.append(token)
            if seq.num_output_tokens == seq.max_new_tokens:
                self.scheduler.finish(seq, "length")

    @precondition(lambda self: self.scheduler.running and sum(len(g.seqs) for g in self.groups) < ROWS)
    @rule(data=st.data())
    def fork(self, data):
        candidates = [s for s in self.scheduler.running if len(s.group.seqs) < MAX_WIDTH]
        if candidates:
            self.scheduler.fork(data.draw(st.sampled_from(candidates)), sample_key=0)

    @precondition(lambda self: self.scheduler.running)
    @rule(data=st.data(), prune=st.booleans())
    def finish(self, data, prune):
        seq = data.draw(st.sampled_from(self.scheduler.running))
        self.scheduler.prune(seq) if prune else self.scheduler.finish(seq, "stop")

    @precondition(lambda self: self.scheduler.running_groups)
    @rule(data=st.data())
    def preempt(self, data):
        self.scheduler.preempt(data.draw(st.sampled_from(self.scheduler.running_groups)))

    def teardown(self):
        for _ in range(200):
            if self.scheduler.done:
                break
            self.step([0] * ROWS)
        assert self.scheduler.done, "requests never finished"
        assert self.cache.allocator.num_free == self.cache.num_blocks, "blocks leaked"
        assert self.cache.num_cached_tokens == 0
        if self.scheduler.swap:
            assert self.scheduler.swap.allocator.num_used == 0 and not self.scheduler.swap.tables

    # ---- what a model would write ------------------------------------------------------
    def _slot(self, seq: Sequence, pos: int) -> tuple[int, int]:
        return seq.block_table[pos // self.cache.block_size], pos % self.cache.block_size

    def _write(self, seq: Sequence, start: int) -> None:
        if self.kv:
            for pos in range(start, seq.num_cached_tokens):
                self.kv.k[0][self._slot(seq, pos)] = seq.token_ids[pos] + 1

    # ---- invariants ------------------------------------------------------------------------
    @invariant()
    def reference_counts_equal_the_tables_holding_each_block(self):
        if not hasattr(self, "cache"):
            return
        running = self.scheduler.running
        held = Counter(b for s in running for b in s.block_table)
        allocator = self.cache.allocator
        assert all(allocator.ref_counts[b] == held[b] for b in range(self.cache.num_blocks))
        assert allocator.num_refs == sum(held.values())  # what the sharing report's peak counts
        assert allocator.num_free + allocator.num_used == self.cache.num_blocks
        assert allocator.num_used == len(held) and sorted(allocator._free) == sorted(set(range(allocator.num_blocks)) - set(held))
        swap = self.scheduler.swap
        if swap:
            held_cpu = Counter(b for table in swap.tables.values() for b in table)
            assert all(swap.allocator.ref_counts[b] == held_cpu[b] for b in range(swap.allocator.num_blocks))
            assert set(swap.tables) == {s for g in self.scheduler.swapped for s in g.seqs}

    @invariant()
    def sequences_are_where_their_status_says(self):
        if not hasattr(self, "cache"):
            return
        for status, groups in ((Status.WAITING, self.scheduler.waiting), (Status.RUNNING, self.scheduler.running_groups),
                               (Status.SWAPPED, self.scheduler.swapped)):
            for g in groups:
                assert g.seqs and all(s.status is status for s in g.seqs)
                if status is not Status.RUNNING:
                    assert all(not s.block_table and s.row == -1 for s in g.seqs)
        rows = [s.row for s in self.scheduler.running]
        assert len(set(rows)) == len(rows) and len(rows) + len(self.cache._free_rows) == ROWS

    @invariant()
    def tables_cover_their_tokens_with_at_most_one_partly_filled_block(self):
        if not hasattr(self, "cache"):
            return
        bs = self.cache.block_size
        fill: dict[int, int] = {}
        for s in self.scheduler.running:
            assert 0 <= len(s.block_table) * bs - s.num_cached_tokens < bs
            assert s.num_cached_tokens == s.num_tokens - 1
            assert self.cache.block_tables[s.row, :len(s.block_table)].tolist() == s.block_table
            for i, b in enumerate(s.block_table):
                assert fill.setdefault(b, min(bs, s.num_cached_tokens - i * bs)) == min(bs, s.num_cached_tokens - i * bs)
        assert self.cache.num_cached_tokens == sum(fill.values())

    @invariant()
    def blocks_hold_their_sequences_tokens(self):
        if not hasattr(self, "cache"):
            return
        prefix_cache = self.cache.prefix_cache
        for s in self.scheduler.running:
            if self.kv:
                written = [int(self.kv.k[0][self._slot(s, p)][0, 0]) for p in range(s.num_cached_tokens)]
                assert written == [t + 1 for t in s.token_ids[:s.num_cached_tokens]]
            if prefix_cache:  # each cached block is keyed by its own tokens after the sequence's own prefix
                bs = self.cache.block_size
                for i, b in enumerate(s.block_table[:s.num_cached_tokens // bs]):
                    entry = prefix_cache._entry_of.get(b)
                    if entry is not None:
                        (parent, block_tokens), prefix = entry
                        assert block_tokens == tuple(s.token_ids[i * bs:(i + 1) * bs]), "a block holds other tokens"
                        assert parent == (s.prefix_ids[i - 1] if i else ROOT), "a block follows another prefix"
                        assert prefix == s.prefix_ids[i]


TestSchedulerStateMachine = SchedulerMachine.TestCase
TestSchedulerStateMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)

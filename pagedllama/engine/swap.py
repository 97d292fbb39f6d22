"""Swap preemption: a preempted request's K/V go to a pool of blocks in CPU memory, and back.

The alternative to recomputing them with a later prefill. vLLM offers both and defaults to
recompute, because copying many small blocks over PCIe is slow; here each swap is one
gather and one scatter over all layers at once. With no KV storage (dry runs) only the
bookkeeping happens.
"""
from __future__ import annotations

import torch

from .block_allocator import BlockAllocator
from .block_manager import KVCache
from .sequence import Sequence


class SwapSpace:
    """A CPU pool of blocks shaped like the cache's, and which of them each swapped sequence holds."""

    def __init__(self, cache: KVCache, swap_bytes: int):
        self.cache = cache
        num_blocks = swap_bytes // (cache.block_size * cache.bytes_per_slot)
        self.allocator = BlockAllocator(num_blocks)
        self.kv = torch.empty((2, cache.kv.shape[1], num_blocks, *cache.kv.shape[3:]), dtype=cache.dtype,
                              pin_memory=cache.device.type == "cuda" and cache.kv.numel() > 0)
        self.tables: dict[Sequence, list[int]] = {}

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return len({b for s in seqs for b in s.block_table}) <= self.allocator.num_free

    def swap_out(self, seqs: list[Sequence]) -> None:
        """Copy `seqs`' blocks here (a block they share, once) and free them in the cache."""
        tables = self.allocator.mirror([s.block_table for s in seqs])
        _copy(self.kv, tables, self.cache.kv, [s.block_table for s in seqs])
        for seq, table in zip(seqs, tables):
            self.tables[seq] = table
            self.cache.release(seq)

    def can_swap_in(self, seqs: list[Sequence], watermark_blocks: int) -> bool:
        blocks = len({b for s in seqs for b in self.tables[s]})
        return self.cache.has_room(blocks, len(seqs), watermark_blocks)

    def swap_in(self, seqs: list[Sequence]) -> None:
        """Copy `seqs`' blocks back into newly allocated cache blocks and free them here."""
        swapped = [self.tables.pop(s) for s in seqs]
        tables = self.cache.allocator.mirror(swapped, self.cache.new_block)
        self.cache.restore(seqs, tables)
        _copy(self.cache.kv, tables, self.kv, swapped)
        for block in (b for table in swapped for b in table):
            self.allocator.free(block)


def _copy(dst: torch.Tensor, dst_tables: list[list[int]], src: torch.Tensor, src_tables: list[list[int]]) -> None:
    """Copy blocks between pools, all layers of K and V at once, each distinct block once."""
    pairs = {d: s for dt, st in zip(dst_tables, src_tables) for d, s in zip(dt, st)}
    dst_ids = torch.tensor(list(pairs), dtype=torch.long, device=dst.device)
    src_ids = torch.tensor(list(pairs.values()), dtype=torch.long, device=src.device)
    dst[:, :, dst_ids] = src[:, :, src_ids].to(dst.device)

"""Swap preemption: a preempted request's K/V go to a pool of blocks in CPU memory, and back.

The alternative to recomputing them with a later prefill. vLLM offers both and defaults to
recompute, because copying many small blocks over PCIe is slow. This class keeps the CPU
pool's bookkeeping; each swap is recorded in the block manager's `ops`, which the model
runner applies as one gather and one scatter over all layers at once (a dry run has none).
"""
from __future__ import annotations

from .block_allocator import BlockAllocator
from .block_manager import SWAP_IN, SWAP_OUT, BlockCopy, BlockManager
from .sequence import Sequence


class SwapSpace:
    """A CPU pool of `num_blocks` blocks shaped like the cache's, and which of them each swapped sequence holds."""

    def __init__(self, block_manager: BlockManager, num_blocks: int):
        self.block_manager = block_manager
        self.allocator = BlockAllocator(num_blocks)
        self.tables: dict[Sequence, list[int]] = {}

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return len({b for s in seqs for b in s.block_table}) <= self.allocator.num_free

    def swap_out(self, seqs: list[Sequence]) -> None:
        """Copy `seqs`' blocks here (a block they share, once) and free them in the cache."""
        tables = self.allocator.mirror([s.block_table for s in seqs])
        self.block_manager.ops.add(SWAP_OUT, _pairs([s.block_table for s in seqs], tables))
        for seq, table in zip(seqs, tables):
            self.tables[seq] = table
            self.block_manager.release(seq)

    def can_swap_in(self, seqs: list[Sequence], watermark_blocks: int) -> bool:
        blocks = len({b for s in seqs for b in self.tables[s]})
        return self.block_manager.has_room(blocks, len(seqs), watermark_blocks)

    def swap_in(self, seqs: list[Sequence]) -> None:
        """Copy `seqs`' blocks back into newly allocated cache blocks and free them here."""
        manager = self.block_manager
        swapped = [self.tables.pop(s) for s in seqs]
        tables = manager.allocator.mirror(swapped, manager.new_block)
        manager.restore(seqs, tables)
        manager.ops.add(SWAP_IN, _pairs(swapped, tables))
        for block in (b for table in swapped for b in table):
            self.allocator.free(block)


def _pairs(src_tables: list[list[int]], dst_tables: list[list[int]]) -> list[BlockCopy]:
    """(source, destination) of each distinct block of the tables, once."""
    return [(s, d) for d, s in {d: s for st, dt in zip(src_tables, dst_tables) for s, d in zip(st, dt)}.items()]

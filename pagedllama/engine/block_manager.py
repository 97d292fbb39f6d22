"""Block bookkeeping: which physical KV block each sequence holds, in plain Python, no tensors.

Both twins use this one class and differ only in their `CacheLayout`:

- naive: `block_size = max_seq_len`. Every request gets one block, i.e. a contiguous row of
  `max_seq_len` slots, reserved in full when it is admitted, as FasterTransformer-era systems
  allocate it.
- naive with `--reserve pow2 | oracle`: 16-slot blocks in one contiguous region; a request
  reserves its policy's slots as one run of consecutive blocks when it is admitted, first fit
  (`ContiguousAllocator`), and waits while no hole holds its run. It never grows past it.
- paged: a small `block_size` (16 by default). A request takes one block at a time as it
  grows, so at most `block_size - 1` of its slots are ever empty.

Python lists (`Sequence.block_table`) decide which physical block a request owns; a host array
(`block_tables`, one row per running sequence) mirrors them, updated one entry per new block, from
which the model runner copies each step's rows to the device (as vLLM and nano-vllm split it).

Blocks carry reference counts, so tables can share them: the samples or beams of one
request hold their common blocks once, and with prefix caching so do requests whose
prompts begin alike. A shared block is copied before it is written (copy on write). The
manager only decides that: each copy, like each swap, is recorded in `ops` for the model
runner to apply to the KV tensors before the step's forward pass. A dry run (capacity
planning) is the scheduler and this class, nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .block_allocator import BlockAllocator
from .config import CacheLayout
from .prefix_cache import PrefixCache
from .sequence import Sequence, SequenceGroup
from .waste import WasteRecorder


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


BlockCopy = tuple[int, int]  # (source block, destination block)
COPY, SWAP_OUT, SWAP_IN = "copy", "swap out", "swap in"  # within the pool, to the CPU pool, and back


@dataclass
class BlockOps:
    """What scheduling decided to do to the KV tensors, for the model runner to apply before the
    step's forward pass: runs of block copies of one kind each, in the order they were decided
    (a block freed by a swap out may be the destination of a copy decided after it)."""

    runs: list[tuple[str, list[BlockCopy]]] = field(default_factory=list)

    def add(self, kind: str, pairs: list[BlockCopy]) -> None:
        if self.runs and self.runs[-1][0] == kind:
            self.runs[-1][1].extend(pairs)
        else:
            self.runs.append((kind, list(pairs)))

    def __bool__(self) -> bool:
        return bool(self.runs)


class BlockManager:
    """The allocator of the pool's blocks, the block tables, the prefix cache, and copy-on-write decisions."""

    def __init__(self, layout: CacheLayout, max_seq_len: int, max_num_seqs: int,
                 recorder: WasteRecorder | None = None):
        """`max_num_seqs`: the block-table rows, one per sequence that may hold blocks at once.
        `recorder`: the waste trace, told of every block (or run) taken and given back."""
        self.layout = layout
        self.block_size = layout.block_size
        self.max_seq_len = max_seq_len
        self.max_num_seqs = max_num_seqs
        self.allocator = BlockAllocator(layout.num_blocks, layout.contiguous, layout.block_size, recorder)
        self.prefix_cache: PrefixCache | None = None
        self.max_blocks_per_seq = cdiv(max_seq_len, layout.block_size)
        self.block_tables = np.zeros((max_num_seqs, self.max_blocks_per_seq), dtype=np.int32)
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.num_cached_tokens = 0  # slots holding a token, each shared block counted once
        self.num_copies = 0  # blocks copied on write
        self.ops = BlockOps()  # decided since the runner last took them (`take_ops`)

    def enable_prefix_caching(self) -> None:
        self.prefix_cache = PrefixCache(self.block_size)

    # ---- memory accounting -------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def reserved_tokens(self) -> int:
        return self.allocator.num_used * self.block_size

    def _fill(self, seq: Sequence, i: int) -> int:
        """Slots of `seq`'s i-th block that hold a token (all holders of a shared block agree)."""
        return min(self.block_size, max(0, seq.num_cached_tokens - i * self.block_size))

    # ---- block management (called by the scheduler) ----------------------------------
    def has_room(self, blocks: int, seqs: int, watermark_blocks: int = 0) -> bool:
        return len(self._free_rows) >= seqs and self.allocator.num_free - blocks >= watermark_blocks

    def can_allocate(self, *seqs: Sequence, watermark_blocks: int = 0) -> bool:
        """Could `seqs`, the sequences of one request, be admitted together (in this order)?
        (A contiguous pool: is there a row and a hole for the request's one run?)"""
        if self.layout.contiguous:
            run = self.run_blocks(seqs[0].group)
            return len(self._free_rows) >= len(seqs) and self.allocator.runs.largest_hole >= run
        blocks = sum(self._admission_blocks(s, seqs[:i]) for i, s in enumerate(seqs))
        return self.has_room(blocks, len(seqs), watermark_blocks)

    def _admission_blocks(self, seq: Sequence, siblings: tuple[Sequence, ...]) -> int:
        """Free blocks that `allocate(seq, siblings)` takes at most.

        Blocks shared with a sibling cost nothing, nor do leading cached blocks in use (they
        stay findable whatever else is admitted); any other cached block might be evicted
        first, so it counts.
        """
        in_use = 0
        for block in self.prefix_cache.lookup(seq) if self.prefix_cache else ():
            if not self.allocator.ref_counts[block]:
                break
            in_use += 1
        return cdiv(seq.num_tokens, self.block_size) - max(in_use, self._common_blocks(seq, siblings)[1])

    def _common_blocks(self, seq: Sequence, siblings: tuple[Sequence, ...]) -> tuple[Sequence | None, int]:
        """The sibling with which `seq` has the most leading full blocks of tokens in common, and
        how many (never the block of `seq`'s last token, whose logits the prefill is for)."""
        bs, best, most = self.block_size, None, 0
        for other in siblings:
            n = 0
            while n < min((seq.num_tokens - 1) // bs, other.num_tokens // bs) and \
                    seq.token_ids[n * bs:(n + 1) * bs] == other.token_ids[n * bs:(n + 1) * bs]:
                n += 1
            if n > most:
                best, most = other, n
        return best, most

    def allocate(self, seq: Sequence, siblings: tuple[Sequence, ...] = ()) -> None:
        """Give an admitted sequence a block-table row and blocks for all its current tokens.

        Its leading full blocks may be already computed ones, whose tokens then need no
        prefill: those of an already allocated sibling (the samples or beams of a request
        recomputed after preemption) or, with prefix caching, cached ones.
        """
        seq.row = self._free_rows.pop()
        if self.layout.contiguous:
            n = self.run_blocks(seq.group)
            first = self.allocator.allocate_run(n)
            assert first is not None, "allocate a reservation only after can_allocate"
            seq.block_table = list(range(first, first + n))
            self._sync_row(seq, 0)
            return
        sibling, common = self._common_blocks(seq, siblings)
        for block in sibling.block_table[:common] if sibling else ():
            self.allocator.share(block)
            seq.block_table.append(block)
        if self.prefix_cache:
            for block in self.prefix_cache.lookup(seq)[common:]:
                self._take_cached(block)
                seq.block_table.append(block)
            self.prefix_cache.queried_tokens += seq.num_tokens
            self.prefix_cache.hit_tokens += len(seq.block_table) * self.block_size
        seq.num_cached_tokens = len(seq.block_table) * self.block_size
        self._sync_row(seq, 0)
        self.grow(seq, seq.num_tokens)

    def run_blocks(self, group: SequenceGroup) -> int:
        """The blocks of a contiguous reservation: the request's policy slots, rounded up to whole blocks."""
        return cdiv(group.reserve_slots, self.block_size)

    def _take_cached(self, block: int) -> None:
        if self.allocator.ref_counts[block]:
            self.allocator.share(block)
        else:  # free but still holding its tokens: reserved again
            self.allocator.reuse(block)
            self.num_cached_tokens += self.block_size

    def blocks_to_grow(self, seqs: list[Sequence]) -> int:
        """Free blocks that `grow` needs so each of `seqs` has a slot for its last token.

        New blocks, plus copies of shared blocks about to be written: the last of a
        block's holders to write it keeps the original, unless holders outside `seqs` remain.
        """
        new, writers = 0, {}
        for seq in seqs:
            blocks, shared = self._growth(seq, seq.num_tokens)
            new += blocks
            if shared is not None:
                writers[seq.block_table[shared]] = writers.get(seq.block_table[shared], 0) + 1
        refs = self.allocator.ref_counts
        return new + sum(n - (refs[block] == n) for block, n in writers.items())

    def _growth(self, seq: Sequence, num_tokens: int) -> tuple[int, int | None]:
        """New blocks `seq` needs for `num_tokens` tokens, and where in its table token
        `num_tokens - 1` goes if that block is shared (None if it is its own or a new one)."""
        last, table = (num_tokens - 1) // self.block_size, seq.block_table
        if last >= len(table):
            return last + 1 - len(table), None
        return 0, last if self.allocator.ref_counts[table[last]] > 1 else None

    def grow_all(self, seqs: list[Sequence]) -> bool:
        """`grow` each of `seqs` to its length if the pool has the blocks for all of them; if not,
        change nothing and return False.

        The common decode step, in one pass: only a sequence whose next token starts a block (one
        step in `block_size`) or lands in a shared one needs more than a look at its table; when
        no block is shared at all (every used block held once), the length alone says which.
        """
        if self.allocator.num_refs == self.allocator.num_used:
            bs = self.block_size
            growing = [s for s in seqs if len(s.token_ids) > len(s.block_table) * bs]
            if growing and self.layout.contiguous:
                seq = growing[0]
                raise UserError(f"request {seq.request_id} outgrew the {seq.group.reserve_slots} slots its "
                                "reservation holds (the answer lengths given do not match this run's: "
                                "give --oracle-lengths from a run of the same model and flags, or use --reserve max)")
        else:
            growing = [s for s in seqs if self._growth(s, len(s.token_ids)) != (0, None)]
        if self.blocks_to_grow(growing) > self.allocator.num_free:
            return False
        for seq in seqs if self.prefix_cache else growing:  # prefix caching registers every filled block
            self.grow(seq, seq.num_tokens)
        return True

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make room for `seq`'s tokens up to `num_tokens`, the last of which this step writes.

        Blocks are allocated one at a time as the sequence fills them; a shared block about
        to be written is first copied (copy on write) so the other holders keep theirs.
        """
        new, shared = self._growth(seq, num_tokens)
        if shared is not None:
            self._copy_on_write(seq, shared)
        if new:
            start = len(seq.block_table)
            seq.block_table += [self.new_block() for _ in range(new)]
            self._sync_row(seq, start)
        if self.prefix_cache:
            self.prefix_cache.register(seq, num_tokens // self.block_size)

    def _copy_on_write(self, seq: Sequence, i: int) -> None:
        old, new = seq.block_table[i], self.new_block()
        self.ops.add(COPY, [(old, new)])
        self.allocator.free(old)
        seq.block_table[i] = new
        self.block_tables[seq.row, i] = new
        self.num_cached_tokens += self._fill(seq, i)
        self.num_copies += 1

    def new_block(self) -> int:
        """A free block for new content; whatever cached prefix it held is forgotten."""
        block = self.allocator.allocate()
        if self.prefix_cache:
            self.prefix_cache.evict(block)
        return block

    def _sync_row(self, seq: Sequence, start: int) -> None:
        """Mirror `seq.block_table[start:]` into its row of the host table."""
        self.block_tables[seq.row, start:len(seq.block_table)] = seq.block_table[start:]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` holds all of `parent`'s blocks too; a shared block is copied when first written."""
        child.row = self._free_rows.pop()
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self.allocator.share(block)
        child.num_cached_tokens = parent.num_cached_tokens
        self.block_tables[child.row] = self.block_tables[parent.row]

    def restore(self, seqs: list[Sequence], tables: list[list[int]]) -> None:
        """Rows and new blocks for sequences coming back from swap space, which still count
        their cached tokens; `tables` are their new block tables (see `BlockAllocator.mirror`)."""
        seen = set()
        for seq, table in zip(seqs, tables):
            seq.row = self._free_rows.pop()
            seq.block_table = table
            self._sync_row(seq, 0)
            for i, block in enumerate(table):
                if block not in seen:
                    seen.add(block)
                    self.num_cached_tokens += self._fill(seq, i)

    def release(self, seq: Sequence) -> None:
        """Let go of `seq`'s blocks and row; it keeps `num_cached_tokens` (swapping brings them back)."""
        if self.layout.contiguous:
            self.allocator.free_run(seq.block_table[0], len(seq.block_table))
            self.num_cached_tokens -= seq.num_cached_tokens
        else:
            for i in reversed(range(len(seq.block_table))):
                block = seq.block_table[i]
                self.allocator.free(block)
                if not self.allocator.ref_counts[block]:
                    self.num_cached_tokens -= self._fill(seq, i)
        seq.block_table = []
        self._free_rows.append(seq.row)
        seq.row = -1

    def free(self, seq: Sequence) -> None:
        """Return a finished (or preempted) sequence's blocks to the pool at once."""
        self.release(seq)
        seq.num_cached_tokens = 0
        seq.prefix_ids.clear()  # recomputed blocks are new blocks: keyed afresh

    def commit(self, seqs: list[Sequence], is_prefill: bool) -> None:
        """Count the step's tokens as cached: prefill caches every token, decode the last one."""
        if is_prefill:
            self.num_cached_tokens += sum(len(s.token_ids) - s.num_cached_tokens for s in seqs)
            for s in seqs:
                s.num_cached_tokens = len(s.token_ids)
        else:
            self.num_cached_tokens += len(seqs)
            for s in seqs:
                s.num_cached_tokens += 1

    def units_written(self, seqs: list[Sequence]) -> tuple[np.ndarray, np.ndarray]:
        """For the waste trace: every live allocation unit, named as the allocator told the recorder
        (a run's first block, or a block, shared ones once), and the slots of each holding a token.
        `seqs`: every sequence holding blocks (the running ones)."""
        cached = np.array([s.num_cached_tokens for s in seqs], dtype=np.int64)
        if self.layout.contiguous:
            return np.array([s.block_table[0] for s in seqs], dtype=np.int64), cached
        lengths = np.array([len(s.block_table) for s in seqs], dtype=np.int64)
        cols = np.arange(lengths.max(initial=0))
        held = cols < lengths[:, None]
        blocks = self.block_tables[np.array([s.row for s in seqs], dtype=np.int64)[:, None], cols][held]
        fill = np.clip(cached[:, None] - cols * self.block_size, 0, self.block_size)[held]
        if self.allocator.num_refs == self.allocator.num_used:  # no block shared: each appears once
            return blocks, fill
        keys, first = np.unique(blocks, return_index=True)  # holders of a shared block agree on its fill
        return keys, fill[first]

    def external_fragmentation_slots(self, head: SequenceGroup | None) -> int:
        """Free slots lost to external fragmentation now: all the contiguous pool's free slots when
        the queue's head (FCFS: the request admission tries next) fits in them but in no hole."""
        if not self.layout.contiguous or head is None:
            return 0
        return self.allocator.runs.external_fragmentation([self.run_blocks(head)]) * self.block_size

    def take_ops(self) -> BlockOps:
        """The copies and swaps decided since the last call, for the runner to apply; starts a new list."""
        ops, self.ops = self.ops, BlockOps()
        return ops

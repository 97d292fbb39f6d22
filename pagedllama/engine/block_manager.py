"""The KV cache: per-layer K/V storage in blocks, block tables, and the attention that reads them.

Both twins use this one class and differ only in two numbers:

- naive: `block_size = max_seq_len`. Every request gets one block, i.e. a contiguous row of
  `max_seq_len` slots, reserved in full when it is admitted. Each layer's K is then exactly
  (batch, max_seq_len, kv_heads, head_dim), as FasterTransformer-era systems allocate it.
- paged: a small `block_size` (16 by default). A request takes one block at a time as it
  grows, so at most `block_size - 1` of its slots are ever empty.

Bookkeeping is split the way vLLM and nano-vllm split it: Python lists (`Sequence.block_table`)
decide which physical block a request owns; a host array (`host_block_tables`, one row per
running request) mirrors them, updated one entry per new block with no tensor op, and each step
copies its requests' rows to the device once, as the kernels' `block_tables`. The step's slot
mapping is computed from the same rows on the host, once per step, never per layer.

Blocks carry reference counts, so tables can share them: the samples or beams of one
request hold their common blocks once, and with prefix caching so do requests whose
prompts begin alike. A shared block is copied before it is written (copy on write).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter

import numpy as np
import torch

from ..model.attention import AttentionBackend, DecodeGroup, plan_decode_groups
from .block_allocator import BlockAllocator
from ..model.config import ModelArgs
from .prefix_cache import PrefixCache
from .sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class StepMetadata:
    """What attention needs to know about one forward step, built once and shared by all layers."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # (T,) int64: flat cache slot where each new token's K/V go
    block_tables: torch.Tensor  # (B, max_blocks) int32: physical blocks of each sequence
    context_lens: torch.Tensor  # (B,) int32: keys per sequence, this step's tokens included
    cache_seqlens: torch.Tensor  # (B,) int32: keys already cached before this step
    context_start_loc: torch.Tensor  # (B+1,) int32: cumulative context_lens (flash-attn varlen)
    query_start_loc: torch.Tensor  # (B+1,) int32: sequence b owns query rows [start[b], start[b+1])
    logits_indices: torch.Tensor  # (B,) int64: the last query row of each sequence
    max_query_len: int
    max_context_len: int
    query_lens: list[int]  # host copies, for loops over sequences
    cached_lens: list[int]  # keys already in the cache before this step

    @cached_property
    def decode_groups(self) -> list[DecodeGroup]:
        """The torch backend's decode plan: made by the first layer that asks, reused by the rest."""
        return plan_decode_groups([c + q for c, q in zip(self.cached_lens, self.query_lens)], self.block_tables)


class KVCache:
    """K/V storage for all layers, the allocator of its blocks, and the block tables."""

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, max_seq_len: int,
                 max_num_seqs: int, backend: AttentionBackend | None, device: torch.device,
                 dtype: torch.dtype, storage: bool = True):
        """`storage=False` keeps only the bookkeeping: simulations plan for GPUs that are not here."""
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.max_num_seqs = max_num_seqs
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.scale = args.head_dim ** -0.5
        self.bytes_per_slot = args.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size())
        layers = args.n_layers if storage else 0
        # One tensor, so that copying a block (copy on write, swapping) is one op over all layers.
        self.kv = torch.zeros((2, layers, num_blocks, block_size, args.n_kv_heads, args.head_dim),
                              device=device, dtype=dtype)
        self.k, self.v = list(self.kv[0]), list(self.kv[1])
        self.allocator = BlockAllocator(num_blocks)
        self.prefix_cache: PrefixCache | None = None
        self.max_blocks_per_seq = cdiv(max_seq_len, block_size)
        self.host_block_tables = np.zeros((max_num_seqs, self.max_blocks_per_seq), dtype=np.int32)
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.num_cached_tokens = 0  # slots holding a token, each shared block counted once
        self.num_copies = 0  # blocks copied on write

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
        """Could `seqs`, the sequences of one request, be admitted together (in this order)?"""
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
        self.kv[:, :, new] = self.kv[:, :, old]
        self.allocator.free(old)
        seq.block_table[i] = new
        self.host_block_tables[seq.row, i] = new
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
        self.host_block_tables[seq.row, start:len(seq.block_table)] = seq.block_table[start:]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` holds all of `parent`'s blocks too; a shared block is copied when first written."""
        child.row = self._free_rows.pop()
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self.allocator.share(block)
        child.num_cached_tokens = parent.num_cached_tokens
        self.host_block_tables[child.row] = self.host_block_tables[parent.row]

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

    # ---- per-step tensors ---------------------------------------------------------------
    def prepare_step(self, seqs: list[Sequence], is_prefill: bool) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        """Input tokens, positions and attention metadata for one step over `seqs`.

        Prefill feeds every token not yet cached; decode feeds each sequence's last token.
        Everything is computed on the host with numpy (on arrays this small an op costs a
        microsecond, a tensor op several) and copied to the device in three arrays.
        """
        b, bs = len(seqs), self.block_size
        token_ids = [s.token_ids for s in seqs]
        context_lens = np.fromiter(map(len, token_ids), np.int64, b)
        if is_prefill:
            cached = np.fromiter((s.num_cached_tokens for s in seqs), np.int64, b)
            tokens = [t for ids, c in zip(token_ids, cached.tolist()) for t in ids[c:]]
        else:
            cached = context_lens - 1
            tokens = [ids[-1] for ids in token_ids]
        query_lens = context_lens - cached
        query_start_loc = np.zeros(b + 1, np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])
        context_start_loc = np.zeros(b + 1, np.int64)
        np.cumsum(context_lens, out=context_start_loc[1:])
        if is_prefill:  # each sequence's positions run from its cached length up
            token_seq = np.repeat(np.arange(b), query_lens)
            positions = np.arange(len(tokens)) - (query_start_loc[:-1] - cached)[token_seq]
        else:
            token_seq, positions = np.arange(b), cached
        max_context_len = int(context_lens.max())
        rows = np.fromiter(map(attrgetter("row"), seqs), np.intp, b)
        block_tables = self.host_block_tables[rows, :cdiv(max_context_len, bs)]
        slot_mapping = block_tables[token_seq, positions // bs].astype(np.int64) * bs + positions % bs  # int32 may overflow
        int64s = torch.from_numpy(np.concatenate([tokens, positions, slot_mapping, query_start_loc[1:] - 1]))
        int32s = torch.from_numpy(np.concatenate([context_lens, cached, context_start_loc, query_start_loc])
                                  .astype(np.int32))
        dev, t = self.device, len(tokens)
        tokens_t, positions_t, slot_mapping_t, logits_indices = int64s.to(dev, non_blocking=True).split([t, t, t, b])
        context_lens_t, cached_t, context_start_t, query_start_t = \
            int32s.to(dev, non_blocking=True).split([b, b, b + 1, b + 1])
        meta = StepMetadata(
            is_prefill=is_prefill,
            slot_mapping=slot_mapping_t,
            block_tables=torch.from_numpy(block_tables).to(dev, non_blocking=True),
            context_lens=context_lens_t,
            cache_seqlens=cached_t,
            context_start_loc=context_start_t,
            query_start_loc=query_start_t,
            logits_indices=logits_indices,
            max_query_len=int(query_lens.max()),
            max_context_len=max_context_len,
            query_lens=query_lens.tolist(),
            cached_lens=cached.tolist(),
        )
        self.commit(seqs, is_prefill)
        return tokens_t, positions_t, meta

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

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: StepMetadata) -> torch.Tensor:
        """Store this step's K/V for `layer` and attend over each sequence's whole context."""
        return self.backend.forward(q, k, v, self.k[layer], self.v[layer], meta, self.scale)

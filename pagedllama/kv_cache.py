"""The KV cache: per-layer K/V storage in blocks, block tables, and the attention that reads them.

Both twins use this one class and differ only in two numbers:

- naive: `block_size = max_seq_len`. Every request gets one block, i.e. a contiguous row of
  `max_seq_len` slots, reserved in full when it is admitted. Each layer's K is then exactly
  (batch, max_seq_len, kv_heads, head_dim), as FasterTransformer-era systems allocate it.
- paged: a small `block_size` (16 by default). A request takes one block at a time as it
  grows, so at most `block_size - 1` of its slots are ever empty.

Bookkeeping is split the way vLLM and nano-vllm split it: Python lists (`Sequence.block_table`)
decide which physical block a request owns, and a device tensor (`block_tables`, one row per
running request) mirrors them for the kernels. The tensor is updated one entry per new block;
each step's slot mapping is computed from it with a few tensor ops, never per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import AttentionBackend
from .block_allocator import BlockAllocator
from .config import ModelArgs
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
    query_lens: list[int]  # host copies, for loops over sequences in prefill
    cached_lens: list[int]  # keys already in the cache before this step


class KVCache:
    """K/V storage for all layers, the allocator of its blocks, and the block tables."""

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, max_seq_len: int,
                 max_num_seqs: int, backend: AttentionBackend | None, device: torch.device,
                 dtype: torch.dtype, storage: bool = True):
        """`storage=False` keeps only the bookkeeping: simulations plan for GPUs that are not here."""
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.scale = args.head_dim ** -0.5
        self.bytes_per_slot = args.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size())
        shape = (num_blocks, block_size, args.n_kv_heads, args.head_dim)
        layers = args.n_layers if storage else 0
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.allocator = BlockAllocator(num_blocks)
        self.max_blocks_per_seq = cdiv(max_seq_len, block_size)
        self.block_tables = torch.zeros(max_num_seqs, self.max_blocks_per_seq, dtype=torch.int32, device=device)
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.num_cached_tokens = 0  # slots holding a token, over all resident sequences

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

    # ---- block management (called by the scheduler) ----------------------------------
    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that `num_tokens` of its tokens have a slot."""
        return max(0, cdiv(num_tokens, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, watermark_blocks: int = 0) -> bool:
        need = self.blocks_needed(seq, seq.num_tokens)
        return bool(self._free_rows) and self.allocator.num_free - need >= watermark_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give an admitted sequence a block-table row and blocks for all its current tokens."""
        seq.row = self._free_rows.pop()
        self.grow(seq, seq.num_tokens)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.allocator.num_free >= self.blocks_needed(seq, num_tokens)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Allocate blocks, one at a time as the sequence fills them, up to `num_tokens` slots."""
        start = len(seq.block_table)
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self.allocator.allocate())
        if len(seq.block_table) > start:
            new = torch.tensor(seq.block_table[start:], dtype=torch.int32)
            self.block_tables[seq.row, start:len(seq.block_table)] = new.to(self.device, non_blocking=True)

    def free(self, seq: Sequence) -> None:
        """Return all of a finished (or preempted) sequence's blocks to the pool at once."""
        for block in reversed(seq.block_table):
            self.allocator.free(block)
        self.num_cached_tokens -= seq.num_cached_tokens
        seq.block_table = []
        seq.num_cached_tokens = 0
        self._free_rows.append(seq.row)
        seq.row = -1

    # ---- per-step tensors ---------------------------------------------------------------
    def prepare_step(self, seqs: list[Sequence], is_prefill: bool) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        """Input tokens, positions and attention metadata for one step over `seqs`.

        Prefill feeds every token not yet cached; decode feeds each sequence's last token.
        """
        if is_prefill:
            cached = [s.num_cached_tokens for s in seqs]
            query_lens = [s.num_tokens - c for s, c in zip(seqs, cached)]
            tokens = [t for s, c in zip(seqs, cached) for t in s.token_ids[c:]]
            positions = torch.cat([torch.arange(c, s.num_tokens) for s, c in zip(seqs, cached)])
        else:
            cached = [s.num_tokens - 1 for s in seqs]
            query_lens = [1] * len(seqs)
            tokens = [s.token_ids[-1] for s in seqs]
            positions = torch.tensor(cached)
        dev = self.device
        positions = positions.to(dev, non_blocking=True)
        rows = torch.tensor([s.row for s in seqs], device=dev)
        q_lens = torch.tensor(query_lens, dtype=torch.int32, device=dev)
        query_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int32, device=dev)
        torch.cumsum(q_lens, 0, out=query_start_loc[1:])
        context_lens = [c + q for c, q in zip(cached, query_lens)]
        context_lens_t = torch.tensor(context_lens, dtype=torch.int32, device=dev)
        context_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int32, device=dev)
        torch.cumsum(context_lens_t, 0, out=context_start_loc[1:])
        max_context_len = max(context_lens)
        block_tables = self.block_tables[rows, :cdiv(max_context_len, self.block_size)]
        token_rows = block_tables if not is_prefill else block_tables.repeat_interleave(q_lens, dim=0)
        block_of_token = token_rows.gather(1, (positions // self.block_size).unsqueeze(1)).squeeze(1)
        slot_mapping = block_of_token.long() * self.block_size + positions % self.block_size
        meta = StepMetadata(
            is_prefill=is_prefill,
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            context_lens=context_lens_t,
            cache_seqlens=context_lens_t - q_lens,
            context_start_loc=context_start_loc,
            query_start_loc=query_start_loc,
            logits_indices=(query_start_loc[1:] - 1).long(),
            max_query_len=max(query_lens),
            max_context_len=max_context_len,
            query_lens=query_lens,
            cached_lens=cached,
        )
        self.commit(seqs, is_prefill)
        return torch.tensor(tokens, device=dev), positions, meta

    def commit(self, seqs: list[Sequence], is_prefill: bool) -> None:
        """Count the step's tokens as cached: prefill caches every token, decode the last one."""
        for s in seqs:
            new = s.num_tokens - s.num_cached_tokens if is_prefill else 1
            s.num_cached_tokens += new
            self.num_cached_tokens += new

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: StepMetadata) -> torch.Tensor:
        """Store this step's K/V for `layer` and attend over each sequence's whole context."""
        return self.backend.forward(q, k, v, self.k[layer], self.v[layer], meta, self.scale)

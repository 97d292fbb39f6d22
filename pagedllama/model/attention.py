"""Attention over a block-table KV cache: three interchangeable backends.

Every backend stores this step's K/V into the cache, then attends each query to its
sequence's keys (the causal mask aligned bottom-right: a sequence's new tokens are the
last ones of its context). They differ only in who reads the block table:

- `torch`: plain PyTorch ops, runs anywhere. Decode sorts the batch by context length and
  cuts it into groups of similar length (`DECODE_MIN_FILL`); each group's K/V is gathered
  through the block tables, padded to its longest context, into one SDPA call. So its work is
  within 1/DECODE_MIN_FILL of the sum of the contexts, not batch x longest context, in a few
  large fused calls. In the naive twin's preallocated rows a group whose rows lie close together
  is read in place instead, with no gather (`DecodeGroup.view`). Prefill runs SDPA per sequence.
- `triton`: the project's own kernel, which follows the block table itself (CUDA).
- `flash-attn`: FlashAttention's paged kernels (CUDA, block size a multiple of 256).

The fourth, `flex` (FlexAttention reading the blocks in place), is in flex_attention.py; which
backend a run gets is decided in backends.py.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F

FLASH_ATTN_PAGE_MULTIPLE = 256  # flash_api.cpp rejects other page sizes in every 2.x release
# The torch backend's decode pads each group of sequences to its longest context; a group takes
# in the next (shorter) sequence while its K/V stay at least this fraction real context.
DECODE_MIN_FILL = 0.9


@dataclass
class StepMetadata:
    """What attention needs to know about one forward step, built once and shared by all layers."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # (T,) int64: flat cache slot where each new token's K/V go
    block_tables: torch.Tensor  # (B, max_blocks_per_seq) int32: physical blocks of each sequence
    context_lens: torch.Tensor  # (B,) int32: keys per sequence, this step's tokens included
    cache_seqlens: torch.Tensor  # (B,) int32: keys already cached before this step
    context_start_loc: torch.Tensor  # (B+1,) int32: cumulative context_lens (flash-attn varlen)
    query_start_loc: torch.Tensor  # (B+1,) int32: sequence b owns query rows [start[b], start[b+1])
    logits_indices: torch.Tensor  # (B,) int64: the last query row of each sequence
    max_query_len: int
    max_context_len: int
    query_lens: list[int]  # host copies, for loops over sequences
    cached_lens: list[int]  # keys already in the cache before this step
    # The naive twin's preallocated rows (`CacheLayout.preallocated`): each sequence's row, its one
    # block (block_tables[:, 0]), which holds its whole context; decode may read rows in place.
    # None for any other layout, where a context may span blocks anywhere in the pool.
    preallocated_rows: list[int] | None = None


class AttentionBackend(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: StepMetadata, scale: float) -> torch.Tensor:
        """q (T, H, D), new k/v (T, Hkv, D), caches (num_blocks, block_size, Hkv, D) -> (T, H, D)."""


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into their flat slots (block * block_size + offset)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int,
              empty: Callable[[tuple[int, ...]], torch.Tensor] | None = None) -> torch.Tensor:
    """Each sequence's first `max_len` slots as a dense (B, max_len, Hkv, D) tensor, gathered
    into `empty(shape)` (default: a fresh tensor).

    When the context fits in one block (always so for the naive twin, whose single block is
    the whole preallocated row), this reads the rows directly with no block indirection.
    """
    block_size, slot_shape = cache.shape[1], cache.shape[2:]
    if empty is None:
        empty = partial(torch.empty, dtype=cache.dtype, device=cache.device)
    if max_len <= block_size:
        rows = block_tables[:, 0]
        return torch.index_select(cache[:, :max_len], 0, rows, out=empty((len(rows), max_len, *slot_shape)))
    num_blocks = -(-max_len // block_size)
    ids = block_tables[:, :num_blocks].flatten()
    # index_select on whole blocks: far faster than advanced indexing
    blocks = torch.index_select(cache, 0, ids, out=empty((len(ids), *cache.shape[1:])))
    return blocks.view(len(block_tables), num_blocks * block_size, *slot_shape)[:, :max_len]


def sdpa_per_head(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """Decode attention, q (B, H, D) against keys/values (B, Hkv, L, D): each query head a
    single-row query, mapped to its KV head by SDPA (`enable_gqa`)."""
    return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale,
                                          enable_gqa=True).squeeze(2)


def sdpa_query_rows(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """The same attention with the query heads of each KV head as the rows of one query (in decode
    nothing masks one from another): (B, Hkv, H / Hkv, D) against each KV head once."""
    rows = q.view(q.shape[0], keys.shape[1], -1, q.shape[-1])
    return F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=scale).view(q.shape)


@dataclass
class RowView:
    """A decode group read in place from preallocated rows: the cache's rows [first, first + count),
    each holding one sequence's whole context; the group's sequences sit at `at` among them.

    Rows of the range outside the group get a zero query over all `max_len` keys (finite: the
    cache starts zeroed and holds only K/V written since), and their outputs are dropped."""

    first: int
    count: int
    at: torch.Tensor | None  # (b,) int64: each member's row - first; None: the range is the group, in order


@dataclass
class DecodeGroup:
    """Sequences of similar context length, attended as one batch padded to the longest."""

    seqs: torch.Tensor | None  # (b,) int64: the group's rows in the step's batch; None: all, in order
    block_tables: torch.Tensor  # (b, max_blocks) int32
    max_len: int  # the longest context in the group, which every other one is padded to
    # (b or view.count, 1, 1, max_len) bool: keys inside each context; None if none is padded
    mask: torch.Tensor | None
    view: RowView | None = None  # read in place (preallocated rows), not gathered


def plan_decode_groups(context_lens: list[int], block_tables: torch.Tensor,
                       min_fill: float = DECODE_MIN_FILL,
                       preallocated_rows: list[int] | None = None) -> list[DecodeGroup]:
    """Cut a decode batch into groups whose padded K/V is at least `min_fill` real context.

    Sequences are taken longest first (a stable sort, so both twins cut a batch the same way);
    a group grows while its contexts fill `min_fill` of (members x its longest). One group keeps
    the batch's own order and needs no gather of queries or scatter of outputs.

    `preallocated_rows` (`StepMetadata.preallocated_rows`, the naive twin's): a group whose rows span at
    most members / `min_fill` consecutive rows is read in place as a view over that range (the
    rows between its members padding it no more than the grouping allows); others are gathered.
    Groups are cut by length first all the same: rows in admission order are an arbitrary
    subset of lengths, and a view over all of them, padded to the longest, costs batch x longest
    context (several times the gather at ShareGPT's uneven lengths: bench/naive_views.py).
    """
    order = sorted(range(len(context_lens)), key=context_lens.__getitem__, reverse=True)
    cuts, start = [], 0
    while start < len(order):
        longest = used = context_lens[order[start]]
        end = start + 1
        while end < len(order) and used + context_lens[order[end]] >= min_fill * longest * (end - start + 1):
            used += context_lens[order[end]]
            end += 1
        cuts.append(order[start:end])
        start = end
    if len(cuts) == 1:
        cuts = [list(range(len(order)))]
    device, groups = block_tables.device, []
    for members in cuts:
        lens = [context_lens[i] for i in members]
        seqs = None if len(cuts) == 1 else torch.tensor(members, device=device)
        view = None if preallocated_rows is None else _row_view([preallocated_rows[i] for i in members],
                                                                   min_fill, device)
        mask = None
        if min(lens) < max(lens):
            lens_t = torch.tensor(lens, device=device)
            if view is not None and view.at is not None:  # the range's other rows: every key, output dropped
                lens_t = torch.full((view.count,), max(lens), device=device).index_copy_(0, view.at, lens_t)
            mask = (torch.arange(max(lens), device=device) < lens_t[:, None])[:, None, None, :]
        groups.append(DecodeGroup(seqs, block_tables if seqs is None else block_tables[seqs], max(lens), mask, view))
    return groups


def _row_view(member_rows: list[int], min_fill: float, device: torch.device) -> RowView | None:
    """The range of rows to read a group in place from, or None when it would pad more than
    `min_fill` allows (or a row held two members, which one query per row cannot seat)."""
    first, count = min(member_rows), max(member_rows) - min(member_rows) + 1
    if count * min_fill > len(member_rows) or len(set(member_rows)) < len(member_rows):
        return None
    at = [r - first for r in member_rows]
    return RowView(first, count, None if at == list(range(count)) else torch.tensor(at, device=device))


class Workspace:
    """Scratch tensors kept from step to step, grown when a step needs more.

    A fresh multi-megabyte tensor per layer is paid for in page faults when it is first
    written, a measurable share of a float32 decode step on the CPU machines measured here
    (BENCHMARKS.md, "Making it fast"). The torch backend's decode gathers its K/V into these.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(numel + numel // 4, dtype=dtype, device=device)
        return buf[:numel].view(shape)


class TorchAttention:
    name = "torch"

    def __init__(self):
        self.workspace = Workspace()
        self._planned: tuple[StepMetadata, list[DecodeGroup]] | None = None  # the step's decode plan

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: StepMetadata, scale: float) -> torch.Tensor:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if meta.is_prefill:
            return self._prefill(q, k, v, k_cache, v_cache, meta, scale)
        return self._decode(q, k_cache, v_cache, self._decode_plan(meta), scale)

    def _decode_plan(self, meta: StepMetadata) -> list[DecodeGroup]:
        """The step's decode groups: planned by the first layer that asks, reused by the rest."""
        if self._planned is None or self._planned[0] is not meta:
            lens = [c + q for c, q in zip(meta.cached_lens, meta.query_lens)]
            self._planned = meta, plan_decode_groups(lens, meta.block_tables, preallocated_rows=meta.preallocated_rows)
        return self._planned[1]

    def _decode(self, q, k_cache, v_cache, groups: list[DecodeGroup], scale: float) -> torch.Tensor:
        """One query per sequence, attended group by group (see `plan_decode_groups`)."""
        if groups[0].seqs is None:  # one group: the whole batch, in order
            return self._attend_group(q, k_cache, v_cache, groups[0], scale)
        out = torch.empty_like(q)
        for g in groups:
            out.index_copy_(0, g.seqs, self._attend_group(q.index_select(0, g.seqs), k_cache, v_cache, g, scale))
        return out

    def _attend_group(self, q, k_cache, v_cache, g: DecodeGroup, scale: float) -> torch.Tensor:
        """The group's K/V, padded to its longest context, in one SDPA call: PyTorch's fused CPU
        kernel, GQA without repeating K/V. Gathered through the block tables, or (`g.view`) read
        in place: a strided view of the rows, which the kernel reads as it reads the gathered copy."""
        if g.view is not None:
            return self._attend_rows(q, k_cache, v_cache, g, scale)
        keys, values = (gather_kv(cache, g.block_tables, g.max_len,
                                  partial(self.workspace.get, name, dtype=q.dtype, device=q.device)).transpose(1, 2)
                        for name, cache in (("keys", k_cache), ("values", v_cache)))
        return self._decode_sdpa(q, keys, values, g.mask, scale)

    def _attend_rows(self, q, k_cache, v_cache, g: DecodeGroup, scale: float) -> torch.Tensor:
        """The group read in place from its range of preallocated rows (see `RowView`)."""
        rows = slice(g.view.first, g.view.first + g.view.count)
        keys, values = (cache[rows, :g.max_len].transpose(1, 2) for cache in (k_cache, v_cache))
        if g.view.at is None:
            return self._decode_sdpa(q, keys, values, g.mask, scale)
        seated = q.new_zeros((g.view.count, *q.shape[1:])).index_copy_(0, g.view.at, q)
        return self._decode_sdpa(seated, keys, values, g.mask, scale).index_select(0, g.view.at)

    def _decode_sdpa(self, q, keys, values, mask, scale) -> torch.Tensor:
        """In float32 the query heads that share a KV head go in as the rows of one query, so the
        kernel reads each KV head once for all of them rather than once per query head: 0.35-0.71x
        the time on the CPU measured (bench/gqa_rows.py, in git before 962e380). In bfloat16 its kernel for single-row
        queries is the faster one at the demo's and the 100M preset's head shapes (mixed at
        Llama 3 8B's)."""
        if q.dtype == torch.float32:
            return sdpa_query_rows(q, keys, values, mask, scale)
        return sdpa_per_head(q, keys, values, mask, scale)

    def _prefill(self, q, k, v, k_cache, v_cache, meta, scale):
        """One SDPA call per sequence: prompt lengths vary too much for padding to pay.

        Tensors go in as (1, H, L, D): with a batch dimension PyTorch's CPU SDPA takes its
        fused (flash) kernel, several times faster than the unfused math it runs on 3-D input.
        """
        out = torch.empty_like(q)
        start = 0
        for i, (q_len, cached) in enumerate(zip(meta.query_lens, meta.cached_lens)):
            end = start + q_len
            qi = q[None, start:end].transpose(1, 2)
            if cached == 0:  # nothing earlier in the cache: attend to the fresh K/V directly
                ki, vi = k[None, start:end].transpose(1, 2), v[None, start:end].transpose(1, 2)
                oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
            else:
                oi = self._prefill_after_cache(qi, k_cache, v_cache, meta, i, scale)
            out[start:end] = oi[0].transpose(0, 1)
            start = end
        return out

    @staticmethod
    def _prefill_after_cache(qi, k_cache, v_cache, meta: StepMetadata, i: int, scale: float) -> torch.Tensor:
        """Sequence `i`'s chunk of queries (1, H, L, D) after its cached context: the context gathered,
        and the causal mask built (SDPA's is_causal is top-left, this one is bottom-right)."""
        cached, q_len = meta.cached_lens[i], meta.query_lens[i]
        ctx = cached + q_len
        ki = gather_kv(k_cache, meta.block_tables[i:i + 1], ctx).transpose(1, 2)
        vi = gather_kv(v_cache, meta.block_tables[i:i + 1], ctx).transpose(1, 2)
        mask = torch.ones(q_len, ctx, dtype=torch.bool, device=qi.device).tril(diagonal=cached)
        return F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)


class TritonAttention:
    name = "triton"

    def __init__(self):
        from .triton_attention import paged_attention, store_kv

        self._paged_attention = paged_attention
        self._store_kv = store_kv

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: StepMetadata, scale: float) -> torch.Tensor:
        self._store_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return self._paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                     meta.query_start_loc, meta.max_query_len, meta.max_context_len, scale)


class FlashAttention:
    """FlashAttention 2's paged API, called as its documentation specifies.

    Decode passes the new K/V to `flash_attn_with_kvcache`, which appends them in place at
    `cache_seqlens` through the block table (and does not advance `cache_seqlens`). Prefill
    stores K/V itself, then runs `flash_attn_varlen_func` over the paged cache.
    """

    name = "flash-attn"

    def __init__(self):
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self._with_kvcache = flash_attn_with_kvcache
        self._varlen = flash_attn_varlen_func

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: StepMetadata, scale: float) -> torch.Tensor:
        if meta.is_prefill:
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
            return self._varlen(q, k_cache, v_cache, cu_seqlens_q=meta.query_start_loc,
                                cu_seqlens_k=meta.context_start_loc, max_seqlen_q=meta.max_query_len,
                                max_seqlen_k=meta.max_context_len, softmax_scale=scale, causal=True,
                                block_table=meta.block_tables)
        out = self._with_kvcache(q.unsqueeze(1), k_cache, v_cache, k=k.unsqueeze(1), v=v.unsqueeze(1),
                                 cache_seqlens=meta.cache_seqlens, block_table=meta.block_tables,
                                 softmax_scale=scale, causal=True)
        return out.squeeze(1)

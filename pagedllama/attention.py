"""Attention over a block-table KV cache: three interchangeable backends.

Every backend stores this step's K/V into the cache, then attends each query to its
sequence's keys (the causal mask aligned bottom-right: a sequence's new tokens are the
last ones of its context). They differ only in who reads the block table:

- `torch`: plain PyTorch ops, runs anywhere. Decode cuts every context into chunks of
  `DECODE_CHUNK` slots, attends to each chunk and merges the chunks of a sequence by their
  log-sum-exp (split-K, as flash-decoding does), so its work is the sum of the contexts, not
  batch x longest context. Prefill runs SDPA per sequence.
- `triton`: the project's own kernel, which follows the block table itself (CUDA).
- `flash-attn`: FlashAttention's paged kernels (CUDA, block size a multiple of 256).
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from .errors import UsageError

if TYPE_CHECKING:
    from .kv_cache import StepMetadata

BACKENDS = ("auto", "flash-attn", "triton", "torch")
FLASH_ATTN_PAGE_MULTIPLE = 256  # flash_api.cpp rejects other page sizes in every 2.x release
# Slots per chunk of the torch backend's decode. Chunks never straddle a block, so the chunk is
# gcd(block_size, 16): 16 for both twins at their defaults, which then compute bit-identically.
DECODE_CHUNK = 16


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


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """Each sequence's first `max_len` slots as a dense (B, max_len, Hkv, D) tensor.

    When the context fits in one block (always so for the naive twin, whose single block is
    the whole preallocated row), this reads the rows directly with no block indirection.
    """
    block_size = cache.shape[1]
    if max_len <= block_size:
        return cache[:, :max_len].index_select(0, block_tables[:, 0])
    num_blocks = -(-max_len // block_size)
    blocks = cache.index_select(0, block_tables[:, :num_blocks].flatten())  # far faster than advanced indexing
    return blocks.view(len(block_tables), num_blocks * block_size, *cache.shape[2:])[:, :max_len]


@dataclass
class DecodeChunks:
    """Every sequence's context cut into chunks of `size` cache slots, as flat tensors."""

    size: int
    seq: torch.Tensor  # (N,) int64: the sequence each chunk belongs to
    index: torch.Tensor  # (N,) int64: the chunk in the cache viewed as (-1, size, Hkv, D)
    valid: torch.Tensor  # (N, size) bool: slots inside the context (only a last chunk has others)


def plan_decode_chunks(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> DecodeChunks:
    """Where each sequence's chunks lie in the cache, from its block table (once per step)."""
    size = math.gcd(block_size, DECODE_CHUNK)
    num_chunks = (context_lens.long() + size - 1) // size
    seq = torch.repeat_interleave(torch.arange(len(context_lens), device=context_lens.device), num_chunks)
    first = torch.cumsum(num_chunks, 0) - num_chunks
    pos = (torch.arange(len(seq), device=seq.device) - first[seq]) * size  # first position in each chunk
    slot = block_tables[seq, pos // block_size].long() * block_size + pos % block_size
    valid = pos[:, None] + torch.arange(size, device=seq.device) < context_lens[seq][:, None]
    return DecodeChunks(size, seq, slot // size, valid)


def merge_chunks(m: torch.Tensor, l: torch.Tensor, o: torch.Tensor, seq: torch.Tensor, batch: int) -> torch.Tensor:
    """Each sequence's attention output from its chunks' softmax statistics (split-K's second
    pass): chunk maxima m and sums l (N, ...), weighted values o (N, ..., D), all float32; every
    chunk is rescaled by exp(m - the sequence's max) before the sums are added up."""
    seq_max = torch.full((batch, *m.shape[1:]), float("-inf"), device=m.device)
    seq_max.scatter_reduce_(0, seq.view(-1, *[1] * (m.dim() - 1)).expand_as(m), m, "amax")
    weight = torch.exp(m - seq_max[seq])
    denom = torch.zeros_like(seq_max).index_add_(0, seq, weight * l)
    out = torch.zeros(batch, *o.shape[1:], device=o.device).index_add_(0, seq, weight[..., None] * o)
    return out / denom[..., None]


class Workspace:
    """Scratch tensors kept from step to step, grown when a step needs more.

    A fresh multi-megabyte tensor per layer is paid for in page faults when it is first
    written, which on the CPU machines measured here cost more than the gather that fills it
    (bench/profile_decode.py measures the difference). The torch backend's decode writes its
    gathered K/V and its matmul outputs into these instead.
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

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if meta.is_prefill:
            return self._prefill(q, k, v, k_cache, v_cache, meta, scale)
        return self._decode(q, k_cache, v_cache, meta.decode_chunks, scale)

    def _decode(self, q, k_cache, v_cache, chunks: DecodeChunks, scale: float) -> torch.Tensor:
        """One query per sequence. Each chunk gets its own softmax (its max m, sum l and
        weighted values o); a sequence's chunks then merge, rescaled by exp(m - max m)."""
        batch, n_heads, head_dim = q.shape
        n_kv_heads, group, size, n = k_cache.shape[2], n_heads // k_cache.shape[2], chunks.size, len(chunks.index)
        shape = (batch, n_kv_heads, group)  # query heads grouped by their KV head

        def scratch(name, *dims):
            return self.workspace.get(name, dims, q.dtype, q.device)

        # Gathering from a transposed view lays each chunk out as (Hkv, size, D), ready for matmul.
        keys, values = (torch.index_select(c.view(-1, size, n_kv_heads, head_dim).transpose(1, 2), 0, chunks.index,
                                           out=scratch(name, n, n_kv_heads, size, head_dim))
                        for name, c in (("keys", k_cache), ("values", v_cache)))
        queries = torch.index_select(q.view(*shape, head_dim), 0, chunks.seq,
                                     out=scratch("queries", n, n_kv_heads, group, head_dim))
        # Softmax statistics in float32 whatever the cache dtype, as fused kernels keep them.
        scores = torch.bmm(queries.view(-1, group, head_dim), keys.view(-1, size, head_dim).transpose(1, 2),
                           out=scratch("scores", n * n_kv_heads, group, size))
        scores = scores.view(n, n_kv_heads, group, size).float().mul_(scale)
        scores.masked_fill_(~chunks.valid[:, None, None, :], float("-inf"))
        m = scores.amax(-1)
        p = torch.exp(scores - m[..., None])
        l = p.sum(-1)
        o = torch.bmm(p.to(values.dtype).view(-1, group, size), values.view(-1, size, head_dim),
                      out=scratch("o", n * n_kv_heads, group, head_dim)).view(n, n_kv_heads, group, head_dim).float()
        return merge_chunks(m, l, o, chunks.seq, batch).view(batch, n_heads, head_dim).to(q.dtype)

    @staticmethod
    def _prefill(q, k, v, k_cache, v_cache, meta, scale):
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
            else:  # a chunk after earlier context: SDPA's is_causal is top-left, so build the mask
                ctx = cached + q_len
                ki = gather_kv(k_cache, meta.block_tables[i:i + 1], ctx).transpose(1, 2)
                vi = gather_kv(v_cache, meta.block_tables[i:i + 1], ctx).transpose(1, 2)
                mask = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(diagonal=cached)
                oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start:end] = oi[0].transpose(0, 1)
            start = end
        return out


class TritonAttention:
    name = "triton"

    def __init__(self):
        from .triton_attention import paged_attention

        self._paged_attention = paged_attention

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
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

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
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


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def select_backend(name: str, device: torch.device, dtype: torch.dtype, block_size: int) -> AttentionBackend:
    """The backend asked for, or a clear error saying why it cannot run here and what to use."""
    cuda = device.type == "cuda"
    if name == "auto":
        if cuda and _importable("flash_attn") and block_size % FLASH_ATTN_PAGE_MULTIPLE == 0 \
                and dtype in (torch.float16, torch.bfloat16):
            name = "flash-attn"
        elif cuda and _importable("triton"):
            name = "triton"
        else:
            name = "torch"
    if name == "flash-attn":
        if not cuda:
            raise UsageError("--attention flash-attn needs a CUDA GPU; use --attention torch here")
        if not _importable("flash_attn"):
            raise UsageError("flash-attn is not installed; `pip install flash-attn --no-build-isolation`, "
                             "or use --attention triton")
        if block_size % FLASH_ATTN_PAGE_MULTIPLE:
            raise UsageError(f"flash-attn's paged kernel needs a block size that is a multiple of "
                             f"{FLASH_ATTN_PAGE_MULTIPLE}, not {block_size}; use --block-size 256 or "
                             "--attention triton")
        if dtype not in (torch.float16, torch.bfloat16):
            raise UsageError("flash-attn runs in float16 or bfloat16 only; use --dtype bfloat16")
        return FlashAttention()
    if name == "triton":
        if not _importable("triton"):
            raise UsageError("triton is not installed; `pip install triton`, or use --attention torch")
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("--attention triton needs a CUDA GPU (or TRITON_INTERPRET=1, very slow); "
                             "use --attention torch here")
        return TritonAttention()
    if name == "torch":
        return TorchAttention()
    raise UsageError(f"unknown --attention {name!r}; choose one of {', '.join(BACKENDS)}")

"""A stand-in for the `flash_attn` package, with its documented signatures and semantics.

flash-attn cannot be installed on a CPU machine, so the tests put this module in
`sys.modules["flash_attn"]` to run the project's call sites. It checks what the real
kernels check (int32 block tables, page size a multiple of 256, (B, Sq, H, D) queries)
and behaves as documented: `flash_attn_with_kvcache` appends k/v in place at
`cache_seqlens` through the block table and does not advance `cache_seqlens`; the causal
mask is aligned bottom-right. The math is a plain dense softmax in float32.
"""
from __future__ import annotations

import torch

PAGE_MULTIPLE = 256
calls: list[str] = []  # which entry points ran, for the tests to check


def _check_paged(k_cache: torch.Tensor, block_table: torch.Tensor) -> None:
    assert block_table.dtype == torch.int32, "block_table must be int32"
    assert k_cache.stride(-1) == 1, "cache last dimension must be contiguous"
    if k_cache.shape[1] % PAGE_MULTIPLE:
        raise RuntimeError("Paged KV cache block size must be divisible by 256")


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """q (Sq, H, D), keys/values (Sk, Hkv, D); causal aligned bottom-right."""
    sq, h, _ = q.shape
    sk, hkv, _ = keys.shape
    keys = keys.repeat_interleave(h // hkv, dim=1).float()
    values = values.repeat_interleave(h // hkv, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale
    if causal:
        allowed = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)


def _paged_keys(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    page = cache.shape[1]
    n = -(-length // page)
    return cache[blocks[:n].long()].flatten(0, 1)[:length]


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    calls.append("flash_attn_with_kvcache")
    assert q.dim() == 4, "q must be (batch, seqlen_q, heads, head_dim)"
    assert rotary_cos is None and cache_batch_idx is None and alibi_slopes is None
    assert window_size == (-1, -1) and softcap == 0.0
    batch, sq, _, d = q.shape
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    if block_table is not None:
        _check_paged(k_cache, block_table)
        assert cache_leftpad is None, "paged KV does not support cache_leftpad"
    if isinstance(cache_seqlens, int) or cache_seqlens is None:
        cache_seqlens = torch.full((batch,), cache_seqlens or 0, dtype=torch.int32)
    assert cache_seqlens.dtype == torch.int32
    page = k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(batch):
        start = int(cache_seqlens[b])
        if k is not None:  # in-place append, through the block table when paged
            for j in range(k.shape[1]):
                pos = start + j
                if block_table is not None:
                    blk, off = int(block_table[b, pos // page]), pos % page
                else:
                    blk, off = b, pos
                k_cache[blk, off] = k[b, j]
                v_cache[blk, off] = v[b, j]
        length = start + (k.shape[1] if k is not None else 0)
        if block_table is not None:
            keys, values = _paged_keys(k_cache, block_table[b], length), _paged_keys(v_cache, block_table[b], length)
        else:
            keys, values = k_cache[b, :length], v_cache[b, :length]
        out[b] = _attend(q[b], keys, values, scale, causal)
    return out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    calls.append("flash_attn_varlen_func")
    assert q.dim() == 3, "varlen q must be (total_q, heads, head_dim)"
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert dropout_p == 0.0
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if block_table is not None:
        _check_paged(k, block_table)
    out = torch.empty_like(q)
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
        if block_table is not None:
            keys, values = _paged_keys(k, block_table[b], ke - ks), _paged_keys(v, block_table[b], ke - ks)
        else:
            keys, values = k[ks:ke], v[ks:ke]
        out[qs:qe] = _attend(q[qs:qe], keys, values, scale, causal)
    return out

"""A stand-in for the `flash_attn` package (2.x), with its documented signatures, checks and semantics.

flash-attn cannot be installed on a CPU machine, so the tests put this module in
`sys.modules["flash_attn"]` to run the project's call sites. It refuses what the real package
refuses, with its messages: its Python layer asserts that a cache written in place has a
contiguous last dimension (and quietly copies q, k and v that have not); its C++ layer
(`flash_api.cpp`, as RuntimeError) takes fp16 and bf16 only, q, k and v of one dtype, int32 block
tables, sequence lengths and cumulative lengths, pages of a multiple of 256 slots, head dims up to
256, and query heads a multiple of the KV heads. It behaves as documented:
`flash_attn_with_kvcache` appends k/v in place at `cache_seqlens` through the block table and
does not advance `cache_seqlens`; the causal mask is aligned bottom-right. The math is a dense
softmax in float32 with the probabilities rounded to the input dtype before they weight V, as the
kernel's second matmul takes them, and the output rounded to the input dtype.
"""
from __future__ import annotations

import torch

PAGE_MULTIPLE = 256
HALF_DTYPES = (torch.float16, torch.bfloat16)
calls: list[str] = []  # which entry points ran, for the tests to check


def _require(condition: bool, message: str) -> None:
    """flash_api.cpp's TORCH_CHECK: a RuntimeError with the kernel's own message."""
    if not condition:
        raise RuntimeError(message)


def _maybe_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    """What the Python layer does to q, k and v before the kernel sees them."""
    return x.contiguous() if x is not None and x.stride(-1) != 1 else x


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor | None) -> None:
    """The checks both entry points make on queries, keys/values (or caches) and the block table."""
    _require(q.dtype in HALF_DTYPES, "FlashAttention only support fp16 and bf16 data type")
    _require(k.dtype == q.dtype, "query and key must have the same dtype")
    _require(v.dtype == q.dtype, "query and value must have the same dtype")
    for t in (q, k, v):
        _require(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")
    if block_table is not None:
        _require(block_table.dtype == torch.int32, "block_table must have dtype torch.int32")
        _require(block_table.stride(-1) == 1, "block_table must have contiguous last dimension")
        _require(k.shape[1] % PAGE_MULTIPLE == 0, "Paged KV cache block size must be divisible by 256")
    _require(q.shape[-1] <= 256, "FlashAttention forward only supports head dimension at most 256")
    _require(q.shape[-2] % k.shape[-2] == 0, "Number of heads in key/value must divide number of heads in query")


def _check_int32_vector(t: torch.Tensor, name: str, length: int) -> None:
    _require(t.dtype == torch.int32, f"{name} must have dtype int32")
    _require(t.is_contiguous(), f"{name} must be contiguous")
    _require(tuple(t.shape) == (length,), f"{name} must have shape (batch_size{' + 1' if 'cu_' in name else ''})")


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
    probs = scores.softmax(-1).to(q.dtype).float()
    return torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)


def _paged_keys(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    page = cache.shape[1]
    n = -(-length // page)
    return cache[blocks[:n].long()].flatten(0, 1)[:length]


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    calls.append("flash_attn_with_kvcache")
    assert k_cache.stride(-1) == 1, "k_cache must have contiguous last dimension"
    assert v_cache.stride(-1) == 1, "v_cache must have contiguous last dimension"
    q, k, v = (_maybe_contiguous(x) for x in (q, k, v))
    assert rotary_cos is None and alibi_slopes is None and window_size == (-1, -1) and softcap == 0.0, \
        "the stand-in does not model rotary, ALiBi, windows or softcapping"
    _check_inputs(q, k_cache, v_cache, block_table)
    _require(q.dim() == 4, "q must have shape (batch_size, seqlen_q, num_heads, head_size)")
    batch, sq, _, d = q.shape
    if block_table is not None:
        _require(cache_batch_idx is None, "Paged KVcache does not support cache_batch_idx")
        _require(cache_leftpad is None, "We don't support Paged KV and leftpad_k running at the same time yet")
    else:
        assert cache_batch_idx is None and cache_leftpad is None, "the stand-in does not model them"
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32)
    if k is not None:
        _require(v is not None, "If key is supplied, value must also be passed in")
        _require(cache_seqlens is not None, "If key is supplied, seqlens_k must also be passed in")
        _require(k.dtype == q.dtype, "Key must have the same dtype as query")
        _require(v.dtype == q.dtype, "Value must have the same dtype as query")
    if cache_seqlens is None:  # the whole cache: every slot of the batch's row (or of its pages)
        cache_seqlens = torch.full((batch,), k_cache.shape[1] * (block_table.shape[1] if block_table is not None
                                                                  else 1), dtype=torch.int32)
    _check_int32_vector(cache_seqlens, "seqlens_k", batch)
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
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
    q, k, v = (_maybe_contiguous(x) for x in (q, k, v))
    assert dropout_p == 0.0 and alibi_slopes is None and window_size == (-1, -1) and softcap == 0.0, \
        "the stand-in does not model dropout, ALiBi, windows or softcapping"
    _check_inputs(q, k, v, block_table)
    _require(q.dim() == 3, "q must have shape (total_q, num_heads, head_size)")
    batch = len(cu_seqlens_q) - 1
    _check_int32_vector(cu_seqlens_q, "cu_seqlens_q", batch + 1)
    _check_int32_vector(cu_seqlens_k, "cu_seqlens_k", batch + 1)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for b in range(batch):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k, "max_seqlen below a sequence's length"
        if block_table is not None:
            keys, values = _paged_keys(k, block_table[b], ke - ks), _paged_keys(v, block_table[b], ke - ks)
        else:
            keys, values = k[ks:ke], v[ks:ke]
        out[qs:qe] = _attend(q[qs:qe], keys, values, scale, causal)
    return out

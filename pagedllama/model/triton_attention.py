"""The project's own paged attention in Triton: one kernel for prefill and decode.

Each program owns one (query tile, KV head, context split, sequence). Its tile rows are
`tokens x group`: consecutive query tokens of one sequence times the `group` query heads
that share the KV head, so every K/V tile is loaded once for the whole group and both
products are `tl.dot`s (rows are padded to at least 16, the smallest dot tile, which also
covers a group of 1 or 3). Keys are visited in tiles of BLOCK_N positions; each position
finds its physical block through the block table itself (`position // PAGE_SIZE`), so any
page size works, from 1 to a whole preallocated row, power of two or not. The softmax is
online, in fp32, base 2.

Decode with few sequences has too few (sequence, KV head) programs to fill the GPU, so the
context may be split across programs (split-K): each writes an fp32 partial output and its
log-sum-exp, and a second small kernel merges them. With one split the attention kernel
writes the final output directly.

New K/V go into the cache through `store_kv`, which skips slots of -1: the padding rows of a
decode step replayed from a CUDA graph (cuda_graphs.py) write nowhere.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MIN_KEYS_PER_SPLIT = 256  # shorter chunks cost more to merge than they gain in parallelism
MAX_SPLITS = 16
LOG2_E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, block_table_ptr, context_lens_ptr, query_start_ptr,
    qk_scale, num_splits, keys_per_split,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt, stride_lh,
    stride_bt,
    GROUP: tl.constexpr, TOKENS: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1) // num_splits
    split = tl.program_id(1) % num_splits
    seq = tl.program_id(2)

    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    context_len = tl.load(context_lens_ptr + seq)
    first_pos = context_len - q_len  # absolute position of the sequence's first query token

    # Row r of the tile is query token `tile * TOKENS + r // GROUP`, head `r % GROUP` of the group.
    rows = tl.arange(0, BLOCK_M)
    token = tile * TOKENS + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < TOKENS * GROUP) & (token < q_len)
    query_pos = first_pos + token
    dims = tl.arange(0, HEAD_DIM)

    q_rows = (q_start + token).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_valid[:, None], other=0.0)

    # Keys this program visits: its split's chunk, cut at the tile's last causal position.
    tile_end = first_pos + tl.minimum(tile * TOKENS + TOKENS, q_len)
    lo = split * keys_per_split
    hi = tl.minimum(tile_end, lo + keys_per_split)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite, so fully masked rows never make NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_valid = keys < hi
        page = tl.load(block_table_ptr + seq * stride_bt + keys // PAGE_SIZE, mask=key_valid, other=0)
        slot = page.to(tl.int64) * stride_kb + (keys % PAGE_SIZE) * stride_ks + kv_head * stride_kh
        k = tl.load(k_ptr + slot[None, :] + dims[:, None], mask=key_valid[None, :], other=0.0)
        v = tl.load(v_ptr + slot[:, None] + dims[None, :], mask=key_valid[:, None], other=0.0)

        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        causal = key_valid[None, :] & (keys[None, :] <= query_pos[:, None])
        s = tl.where(causal, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # A row with no keys in this split (l_i == 0) writes zeros and a log-sum-exp of -inf.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = split * stride_os + (q_start + token).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(o_ptr + o_rows[:, None] + dims[None, :], out, mask=row_valid[:, None])
    if WRITE_LSE:
        lse_rows = split * stride_ls + (q_start + token).to(tl.int64) * stride_lt + head * stride_lh
        tl.store(lse_ptr + lse_rows, m_i + tl.log2(l_i), mask=row_valid)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_kt, stride_vt,
                     ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    """One token's K and V rows (kv_heads x head_dim) into its cache slot, unless the slot is -1."""
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    cols = tl.arange(0, ROW_PAD)
    mask = cols < tl.where(slot >= 0, ROW, 0)
    dest = slot * ROW + cols
    tl.store(k_cache_ptr + dest, tl.load(k_ptr + token * stride_kt + cols, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dest, tl.load(v_ptr + token * stride_vt + cols, mask=mask), mask=mask)


@triton.jit
def _merge_splits_kernel(
    partial_ptr, lse_ptr, out_ptr, num_splits,
    stride_ps, stride_pt, stride_ph,
    stride_ls, stride_lt, stride_lh,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """Combine one (token, head)'s split outputs, weighting each by its share of the softmax."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    present = splits < num_splits

    lse = tl.load(lse_ptr + splits * stride_ls + token * stride_lt + head * stride_lh,
                  mask=present, other=float("-inf"))
    # Split 0 holds key 0 of every real row, so its max is finite; a padding row of a CUDA graph's
    # bucket (context 0) has no key in any split and gets zeros, not -inf - -inf = NaN.
    top = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0))
    parts = tl.load(partial_ptr + (splits * stride_ps + token * stride_pt + head * stride_ph)[:, None]
                    + dims[None, :], mask=present[:, None], other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(num_programs: int, max_context_len: int, device: torch.device) -> int:
    """Enough context splits to give every SM a program, but never chunks that are too short."""
    if device.type != "cuda" or num_programs >= _sm_count(device):
        return 1
    by_sms = triton.cdiv(_sm_count(device), num_programs)
    by_length = max(1, max_context_len // MIN_KEYS_PER_SPLIT)
    return min(by_sms, by_length, MAX_SPLITS)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new K/V (T, Hkv, D) into their flat slots of the (blocks, page, Hkv, D) caches;
    a slot of -1 is skipped."""
    num_tokens = k.shape[0]
    row = k.shape[1] * k.shape[2]
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k.stride(1) == k.shape[2] and k.stride(2) == 1 and v.stride(1) == v.shape[2] and v.stride(2) == 1
    if num_tokens:
        _store_kv_kernel[(num_tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                        ROW=row, ROW_PAD=triton.next_power_of_2(row))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, context_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, max_query_len: int, max_context_len: int,
                    scale: float) -> torch.Tensor:
    """Causal attention of varlen queries (T, H, D) over a paged (blocks, page, Hkv, D) cache.

    The K/V of the query tokens must already be in the cache; sequence b's queries are the
    last `q_len_b` of its `context_lens[b]` keys (bottom-right aligned causal mask).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    num_seqs = context_lens.shape[0]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    assert q.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert block_table.stride(-1) == 1

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    # Decode rows are one token's group; prefill tiles take up to 64 rows of consecutive tokens.
    block_m = max(16, triton.next_power_of_2(group),
                  min(64, triton.next_power_of_2(max_query_len * group)))
    tokens = block_m // group
    block_n = 64 if head_dim * q.element_size() <= 256 else 32  # K/V tiles of <= 16 KiB per stage
    num_tiles = triton.cdiv(max_query_len, tokens)
    num_splits = _num_splits(num_tiles * num_kv_heads * num_seqs, max_context_len, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(max(max_context_len, 1), num_splits), block_n) * block_n

    if num_splits == 1:
        o, lse = out, out  # lse is never written; `out` only fills the pointer argument
        o_strides, lse_strides = (0, out.stride(0), out.stride(1)), (0, 0, 0)
    else:
        o = torch.empty(num_splits, num_tokens, num_heads, head_dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(num_splits, num_tokens, num_heads, device=q.device, dtype=torch.float32)
        o_strides, lse_strides = o.stride()[:3], lse.stride()

    grid = (num_tiles, num_kv_heads * num_splits, num_seqs)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, o, lse, block_table, context_lens, query_start_loc,
        scale * LOG2_E, num_splits, keys_per_split,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *o_strides, *lse_strides,
        block_table.stride(0),
        GROUP=group, TOKENS=tokens, PAGE_SIZE=page_size, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, WRITE_LSE=num_splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            o, lse, out, num_splits,
            o.stride(0), o.stride(1), o.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits),
        )
    return out

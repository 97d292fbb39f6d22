"""The Triton paged attention against a dense reference, run on CPU by Triton's interpreter."""
from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
pytest.importorskip("triton")

from conftest import (CPU, REFERENCE_SHAPES, lively_state_dict, make_engine, random_requests,  # noqa: E402
                      run_against_reference)
from pagedllama.io.checkpoint import build_model  # noqa: E402
from pagedllama.model import triton_attention  # noqa: E402
from pagedllama.model.attention import TritonAttention  # noqa: E402
from pagedllama.model.triton_attention import paged_attention  # noqa: E402

GARBAGE = 10 ** 6  # block-table entries past a sequence's last block: never dereferenced


def make_case(q_lens: list[int], context_lens: list[int], page_size: int, n_heads: int,
              n_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """Random queries and cache; each sequence's blocks are scattered, out-of-order physical ids."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // page_size) for c in context_lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + 5  # a few blocks nobody owns
    physical = torch.randperm(num_blocks, generator=gen)
    block_table = torch.full((len(q_lens), max_blocks), GARBAGE, dtype=torch.int32)
    taken = 0
    for b, n in enumerate(blocks_per_seq):
        block_table[b, :n] = physical[taken:taken + n]
        taken += n
    shape = (num_blocks, page_size, n_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), n_heads, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return q, k_cache, v_cache, block_table, torch.tensor(context_lens, dtype=torch.int32), query_start_loc


def reference(q, k_cache, v_cache, block_table, context_lens, query_start_loc, scale):
    """Per sequence: gather keys through the block table, repeat KV heads, masked softmax in fp64."""
    page_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(len(context_lens)):
        ctx = int(context_lens[b])
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        blocks = block_table[b, :-(-ctx // page_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx].double().repeat_interleave(group, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:ctx].double().repeat_interleave(group, dim=1)
        qb = q[start:end].double()
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale
        query_pos = torch.arange(ctx - (end - start), ctx)[:, None]
        scores.masked_fill_(torch.arange(ctx)[None, :] > query_pos, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def check(q_lens, context_lens, page_size, n_heads, n_kv_heads, head_dim=32,
          dtype=torch.float32, atol=1e-4):
    q, k_cache, v_cache, block_table, ctx, qsl = make_case(
        q_lens, context_lens, page_size, n_heads, n_kv_heads, head_dim, dtype)
    scale = head_dim ** -0.5
    out = paged_attention(q, k_cache, v_cache, block_table, ctx, qsl, max(q_lens), max(context_lens), scale)
    assert out.shape == q.shape and out.dtype == dtype
    expected = reference(q, k_cache, v_cache, block_table, ctx, qsl, scale)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("page_size", [1, 3, 16, 256])
@pytest.mark.parametrize("n_heads,n_kv_heads", [(2, 2), (8, 2), (6, 2)])
def test_decode_batch_of_very_different_lengths(page_size, n_heads, n_kv_heads):
    check([1, 1, 1, 1], [1, 7, 70, 300], page_size, n_heads, n_kv_heads)


@pytest.mark.parametrize("page_size", [1, 16, 5])
@pytest.mark.parametrize("n_heads,n_kv_heads", [(2, 2), (8, 2)])
def test_prefill_without_earlier_context(page_size, n_heads, n_kv_heads):
    check([3, 40, 1, 150], [3, 40, 1, 150], page_size, n_heads, n_kv_heads)


@pytest.mark.parametrize("page_size", [1, 16, 5])
@pytest.mark.parametrize("n_heads,n_kv_heads", [(2, 2), (8, 2)])
def test_query_chunk_after_earlier_context(page_size, n_heads, n_kv_heads):
    check([9, 20, 1], [30, 85, 50], page_size, n_heads, n_kv_heads)


@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
def test_head_dims(head_dim):
    check([1, 6], [33, 70], 16, 4, 1, head_dim=head_dim)


@pytest.mark.parametrize("n_heads", [16, 32])
def test_large_groups(n_heads):
    """Groups of 16 or more fill whole tiles on their own, one query token per tile."""
    check([1, 3], [20, 40], 16, n_heads, 1, head_dim=16)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # empty split: lse -inf
@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_split_k(monkeypatch, num_splits):
    """Forced splits, more than some sequences have keys for, merged by log-sum-exp."""
    monkeypatch.setattr(triton_attention, "_num_splits", lambda *args: num_splits)
    check([1, 1, 1], [1, 70, 300], 16, 8, 2)
    check([4, 20], [4, 150], 3, 8, 2)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # empty split: lse -inf
@pytest.mark.parametrize("num_splits", [1, 3])
def test_padding_row_with_no_context_gives_zeros(monkeypatch, num_splits):
    """A CUDA graph's padding row (context 0, cuda_graphs.py) has no key in any split: zeros, not the
    NaN of merging splits that are all -inf; the real row beside it is unchanged."""
    monkeypatch.setattr(triton_attention, "_num_splits", lambda *args: num_splits)
    q, k_cache, v_cache, block_table, ctx, qsl = make_case([1, 1], [0, 300], 16, 8, 2, 32, torch.float32)
    out = paged_attention(q, k_cache, v_cache, block_table, ctx, qsl, 1, 300, 0.2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    expected = reference(q[1:], k_cache, v_cache, block_table[1:], ctx[1:], qsl[1:] - 1, 0.2)
    torch.testing.assert_close(out[1:].double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skip(
        reason="Triton 3.9's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits")),
])
def test_half_precision(dtype):
    check([1, 1, 12], [9, 130, 40], 16, 8, 2, dtype=dtype, atol=2e-2)


def test_strided_queries():
    """q may be a view of a fused QKV projection, strided over tokens."""
    q, k_cache, v_cache, block_table, ctx, qsl = make_case([2, 5], [10, 5], 4, 4, 2, 32, torch.float32)
    qkv = torch.cat([q, torch.randn_like(q)], dim=1)
    out = paged_attention(qkv[:, :4], k_cache, v_cache, block_table, ctx, qsl, 5, 10, 0.3)
    torch.testing.assert_close(out.double(), reference(q, k_cache, v_cache, block_table, ctx, qsl, 0.3),
                               atol=1e-4, rtol=0)


def test_engine_through_the_kernel_equals_the_formulas():
    """The whole engine with the Triton backend (prefill, decode, a request waiting for room and
    recomputed after preemption), every token against the float64 reference, at Llama 3.1's RoPE
    scaling with GQA 8."""
    args = REFERENCE_SHAPES["3.1-gqa8-hd64"]
    sd = lively_state_dict(args, seed=23)
    model = build_model(args, sd, CPU, torch.float32, max_positions=64)
    requests = random_requests([(1, 6), (37, 4), (20, 5)], args.vocab_size)
    engine = make_engine(model, 16, 4, 64, len(requests), TritonAttention())  # 64 slots: requests take turns
    run_against_reference(engine, requests, sd)
    assert not engine.scheduler.stats.fits_in_memory

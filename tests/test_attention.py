"""Attention backends against a dense reference, through scattered block tables."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import flash_attn_standin
from conftest import CPU
from hypothesis import given, strategies as st

from pagedllama.attention import DECODE_MIN_FILL, FlashAttention, TorchAttention, plan_decode_groups, select_backend
from pagedllama.config import ModelArgs
from pagedllama.errors import UsageError
from pagedllama.kv_cache import KVCache
from pagedllama.sequence import Sequence

ARGS = ModelArgs(dim=128, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=10, hidden_dim=32)  # GQA 4:1, D 16
H, HKV, D = 8, 2, 16


def dense_reference(q, keys, values, scale):
    """q (Sq, H, D) are the last Sq positions of keys/values (Sk, Hkv, D)."""
    sq, sk = q.shape[0], keys.shape[0]
    k = keys.double().repeat_interleave(H // HKV, dim=1)
    v = values.double().repeat_interleave(H // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    allowed = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def run_steps(backend, block_size, dtype, lengths=(1, 37, 300), seed=0):
    """Prefill, one decode step, then a 5-token chunk after the context; compare each step."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(n + 6) // block_size) for n in lengths) + 4  # all steps fit, a few spare
    cache = KVCache(ARGS, num_blocks, block_size, 512, len(lengths), backend, CPU, dtype)
    shuffled = torch.randperm(num_blocks, generator=g).tolist()
    cache.allocator._free.clear()
    cache.allocator._free.extend(shuffled)
    seqs = [Sequence(i, str(i), [0] * n, n, 100) for i, n in enumerate(lengths)]
    full_k = [torch.empty(0, HKV, D, dtype=dtype) for _ in seqs]
    full_v = [torch.empty(0, HKV, D, dtype=dtype) for _ in seqs]
    for seq in seqs:
        cache.allocate(seq)
    for step in ("prefill", "decode", "chunk"):
        if step != "prefill":
            for seq in seqs:
                seq.token_ids += [0] * (1 if step == "decode" else 5)
                cache.grow(seq, seq.num_tokens)
        _, _, meta = cache.prepare_step(seqs, is_prefill=step != "decode")
        t = int(meta.query_start_loc[-1])
        q = torch.randn(t, H, D, generator=g).to(dtype)
        k = torch.randn(t, HKV, D, generator=g).to(dtype)
        v = torch.randn(t, HKV, D, generator=g).to(dtype)
        out = backend.forward(q, k, v, cache.k[0], cache.v[0], meta, cache.scale)
        assert out.shape == q.shape and out.dtype == dtype
        start = 0
        for i, n in enumerate(meta.query_lens):
            full_k[i] = torch.cat([full_k[i], k[start:start + n]])
            full_v[i] = torch.cat([full_v[i], v[start:start + n]])
            want = dense_reference(q[start:start + n], full_k[i], full_v[i], cache.scale)
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(out[start:start + n].double(), want, atol=tol, rtol=tol)
            start += n
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16, 24, 512])
def test_torch_backend(block_size, dtype):
    run_steps(TorchAttention(), block_size, dtype)


@pytest.mark.parametrize("lengths", [(40, 40, 40), (64, 61, 60, 58)])
def test_torch_backend_one_decode_group(lengths):
    """Equal contexts (no mask) and nearly equal ones (one padded group) take the one-group path."""
    run_steps(TorchAttention(), 16, torch.float32, lengths)


@given(st.lists(st.integers(1, 3000), min_size=1, max_size=80), st.sampled_from([0.5, DECODE_MIN_FILL, 1.0]))
def test_decode_groups_cover_the_batch_and_stay_full(lengths, min_fill):
    tables = torch.arange(len(lengths) * 3, dtype=torch.int32).view(len(lengths), 3)
    groups = plan_decode_groups(lengths, tables, min_fill)
    if len(groups) == 1:
        assert groups[0].seqs is None and groups[0].block_tables is tables
        members = [list(range(len(lengths)))]
    else:
        members = [g.seqs.tolist() for g in groups]
        assert sorted(i for m in members for i in m) == list(range(len(lengths)))
    for g, m in zip(groups, members):
        lens = [lengths[i] for i in m]
        # fill at least min_fill, up to float rounding (0.9 * 3 * 3000 is 8100.000000000001)
        assert g.max_len == max(lens) and sum(lens) >= min_fill * len(lens) * max(lens) * (1 - 1e-12)
        assert torch.equal(g.block_tables, tables[m])
        if g.mask is None:
            assert min(lens) == max(lens)
        else:
            assert g.mask.shape == (len(m), 1, 1, max(lens)) and g.mask.sum(-1).flatten().tolist() == lens
    for earlier, later in zip(members, members[1:]):  # longest first, and a group stops only when it must
        assert min(lengths[i] for i in earlier) >= max(lengths[i] for i in later)
        grown = [lengths[i] for i in earlier] + [lengths[later[0]]]
        assert sum(grown) < min_fill * len(grown) * max(grown)


def test_torch_backend_reuses_its_scratch_buffers_across_steps_of_any_size():
    """Decode writes into buffers kept from earlier steps; a larger step must grow them and a
    smaller one must not see stale data."""
    backend = TorchAttention()
    for lengths in ((300, 37, 1), (2,), (500, 480, 3, 64), (5, 9)):
        run_steps(backend, 16, torch.float32, lengths)
    assert backend.workspace.get("keys", (2, 3), torch.float32, CPU).shape == (2, 3)


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_standin)
    flash_attn_standin.calls.clear()
    return flash_attn_standin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attn_call_site(standin, dtype):
    run_steps(FlashAttention(), 256, dtype)
    assert standin.calls.count("flash_attn_varlen_func") == 2  # prefill and the chunk
    assert standin.calls.count("flash_attn_with_kvcache") == 1  # decode, appending in place


def test_flash_attn_decode_appends_in_place_and_keeps_seqlens(standin):
    cache_k = torch.zeros(2, 256, HKV, D)
    cache_v = torch.zeros(2, 256, HKV, D)
    seqlens = torch.tensor([3, 0], dtype=torch.int32)
    k = torch.randn(2, 1, HKV, D)
    standin.flash_attn_with_kvcache(torch.randn(2, 1, H, D), cache_k, cache_v, k=k, v=k, cache_seqlens=seqlens,
                                    block_table=torch.tensor([[1], [0]], dtype=torch.int32), causal=True)
    assert torch.equal(cache_k[1, 3], k[0, 0]) and torch.equal(cache_k[0, 0], k[1, 0])
    assert seqlens.tolist() == [3, 0]


def test_flash_attn_rejects_small_pages_like_the_real_kernel(standin):
    with pytest.raises(RuntimeError, match="256"):
        run_steps(FlashAttention(), 16, torch.float32)


def test_backend_selection_errors_here(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        select_backend("flash-attn", CPU, torch.float32, 256, 256)
    with pytest.raises(UsageError, match="triton"):
        select_backend("triton", CPU, torch.float32, 16, 4096)
    with pytest.raises(UsageError, match="choose one of"):
        select_backend("xformers", CPU, torch.float32, 16, 4096)
    assert select_backend("auto", CPU, torch.float32, 16, 4096).name == "torch"


def test_flash_attn_block_size_rule(standin, monkeypatch):
    cuda = torch.device("cuda")
    with pytest.raises(UsageError, match="multiple of 256"):
        select_backend("flash-attn", cuda, torch.bfloat16, 16, 8192)
    with pytest.raises(UsageError, match="float16 or bfloat16"):
        select_backend("flash-attn", cuda, torch.float32, 256, 8192)
    assert select_backend("flash-attn", cuda, torch.bfloat16, 8192, 16).name == "flash-attn"  # asked for: this twin's


def test_auto_picks_one_backend_for_both_twins(standin, monkeypatch):
    """The naive twin's block (max_seq_len, a multiple of 256) suits flash-attn, the paged twin's 16 does
    not: auto gives both twins the same kernel, whichever of them asks."""
    cuda = torch.device("cuda")
    for naive_block, paged_block in ((8192, 16), (8192, 256)):
        naive = select_backend("auto", cuda, torch.bfloat16, naive_block, paged_block).name
        assert naive == select_backend("auto", cuda, torch.bfloat16, paged_block, naive_block).name
        assert (naive == "flash-attn") == (paged_block == 256)


def test_benchmark_baseline_is_a_correct_attention():
    """bench/baselines.py keeps the torch backend the speed work replaced, for before/after
    measurements; they only mean something if it computes the same attention."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from baselines import PaddedTorchAttention, PerHeadGqaTorchAttention, SplitKTorchAttention

    for backend in (PaddedTorchAttention, SplitKTorchAttention, PerHeadGqaTorchAttention):
        for block_size in (16, 512):
            run_steps(backend(), block_size, torch.float32)


def test_gqa_rows_benchmark_times_the_same_attention_both_ways():
    """bench/gqa_rows.py times decode SDPA per head and with a KV head's query heads as rows; the
    torch backend picks between them by dtype, so both must be the same attention."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from gqa_rows import forms

    for dtype in (torch.float32, torch.bfloat16):
        f = forms(batch=3, context=40, kv_heads=2, group=3, head_dim=16, dtype=dtype)
        torch.testing.assert_close(f["rows"]().reshape(3, 6, 16), f["per head"]().squeeze(2))

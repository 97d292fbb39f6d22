"""Attention backends against a dense reference, through scattered block tables."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import flash_attn_standin
from conftest import CPU
from hypothesis import example, given, strategies as st

from pagedllama.engine.block_manager import BlockManager
from pagedllama.engine.config import CacheLayout, EngineConfig
from pagedllama.engine.sequence import Sequence
from pagedllama.errors import UsageError
from pagedllama.model import attention, backends
from pagedllama.model.attention import (DECODE_MIN_FILL, FlashAttention, TorchAttention, Workspace, gather_kv,
                                        plan_decode_groups)
from pagedllama.model.backends import select_backend
from pagedllama.model.config import ModelArgs
from pagedllama.model.model_runner import ModelRunner

ARGS = ModelArgs(dim=128, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=10, hidden_dim=32)  # GQA 4:1, D 16
H, HKV, D = 8, 2, 16
# Attention in half precision against the same inputs in float32 or float64: flash-attn rounds the
# softmax probabilities and its output to the input dtype, each within a unit of 2^-8 (bf16, 8
# significant bits) or 2^-11 (fp16, 11); the tolerance is four such units, absolute and relative.
# The torch backend's half-precision SDPA stays within it too.
HALF_TOLERANCE = {torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}


def manager_and_runner(num_blocks: int, block_size: int, max_seq_len: int, rows: int, backend,
                       dtype: torch.dtype) -> tuple[BlockManager, ModelRunner]:
    """Block bookkeeping, and a model runner (no model: only its KV tensors and step preparation)."""
    layout = CacheLayout(block_size, num_blocks)
    config = EngineConfig("paged", ARGS, max_seq_len, dtype, CPU, block_size)
    return BlockManager(layout, max_seq_len, rows), ModelRunner(config, None, layout, rows, backend)


def dense_reference(q, keys, values, scale, dtype=torch.float64):
    """q (Sq, H, D) are the last Sq positions of keys/values (Sk, Hkv, D); computed in `dtype`."""
    sq, sk = q.shape[0], keys.shape[0]
    k = keys.to(dtype).repeat_interleave(H // HKV, dim=1)
    v = values.to(dtype).repeat_interleave(H // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(dtype), k) * scale
    allowed = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def run_steps(backend, block_size, dtype, lengths=(1, 37, 300), seed=0, reference_dtype=torch.float64,
              tolerance=None, steps=("prefill", "decode", "chunk"), scale=None):
    """By default prefill, one decode step, then a 5-token chunk after the context; compare each
    step with the dense reference in `reference_dtype`, within `tolerance` (absolute and relative;
    by default 1e-5 in float32, HALF_TOLERANCE in half precision). `scale`: the softmax scale
    (default 1/sqrt(D))."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(n + 6) // block_size) for n in lengths) + 4  # all steps fit, a few spare
    manager, runner = manager_and_runner(num_blocks, block_size, 512, len(lengths), backend, dtype)
    cache = runner.cache
    shuffled = torch.randperm(num_blocks, generator=g).tolist()
    manager.allocator._free.clear()
    manager.allocator._free.extend(shuffled)
    seqs = [Sequence(i, str(i), [0] * n, n, 100) for i, n in enumerate(lengths)]
    full_k = [torch.empty(0, HKV, D, dtype=dtype) for _ in seqs]
    full_v = [torch.empty(0, HKV, D, dtype=dtype) for _ in seqs]
    for seq in seqs:
        manager.allocate(seq)
    for step in steps:
        if step != "prefill":
            for seq in seqs:
                seq.token_ids += [0] * (1 if step == "decode" else 5)
                manager.grow(seq, seq.num_tokens)
        _, _, meta = runner.prepare(seqs, step != "decode", manager.block_tables)
        manager.commit(seqs, step != "decode")
        t = int(meta.query_start_loc[-1])
        q = torch.randn(t, H, D, generator=g).to(dtype)
        k = torch.randn(t, HKV, D, generator=g).to(dtype)
        v = torch.randn(t, HKV, D, generator=g).to(dtype)
        out = backend.forward(q, k, v, cache.k[0], cache.v[0], meta, scale or cache.scale)
        assert out.shape == q.shape and out.dtype == dtype
        start = 0
        for i, n in enumerate(meta.query_lens):
            full_k[i] = torch.cat([full_k[i], k[start:start + n]])
            full_v[i] = torch.cat([full_v[i], v[start:start + n]])
            want = dense_reference(q[start:start + n], full_k[i], full_v[i], scale or cache.scale, reference_dtype)
            tol = tolerance or (1e-5 if dtype == torch.float32 else HALF_TOLERANCE[dtype])
            torch.testing.assert_close(out[start:start + n].to(reference_dtype), want, atol=tol, rtol=tol)
            start += n
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16, 24, 512])
def test_torch_backend(block_size, dtype):
    run_steps(TorchAttention(), block_size, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [(40, 40, 40), (64, 61, 60, 58)])
def test_torch_backend_one_decode_group(lengths, dtype):
    """Equal contexts (no mask) and nearly equal ones (one padded group, masked) take the one-group
    path, in float32 (query heads as rows) and bfloat16 (per head)."""
    run_steps(TorchAttention(), 16, dtype, lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 512])
def test_torch_backend_uses_the_scale_it_is_given(block_size, dtype):
    """Prefill, a chunk and decode (in several groups or one), with a scale other than 1/sqrt(D)."""
    for lengths in ((1, 37, 300, 290), (64, 61, 60, 58)):
        run_steps(TorchAttention(), block_size, dtype, lengths, scale=0.3)


def test_torch_backend_chunk_after_one_cached_token():
    """A prefill chunk after exactly one cached token still reads that token from the cache."""
    run_steps(TorchAttention(), 4, torch.float32, (1, 5), steps=("prefill", "chunk", "chunk"))


@given(st.lists(st.integers(1, 3000), min_size=1, max_size=80), st.sampled_from([0.5, DECODE_MIN_FILL, 1.0]))
@example([163, 326, 326, 326, 326], 0.9)  # exactly 90% full: 0.9 * 326 * 5 rounds above 1467, 0.9 * 5 * 326 not
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
            assert min(lens) < max(lens)  # equal contexts need no mask
    for earlier, later in zip(members, members[1:]):  # longest first, and a group stops only when it must
        assert min(lengths[i] for i in earlier) >= max(lengths[i] for i in later)
        grown = [lengths[i] for i in earlier] + [lengths[later[0]]]
        assert sum(grown) < min_fill * len(grown) * max(grown) * (1 + 1e-12)  # rounding, as above


def test_torch_backend_reuses_its_scratch_buffers_across_steps_of_any_size():
    """Decode writes into buffers kept from earlier steps; a larger step must grow them and a
    smaller one must not see stale data."""
    backend = TorchAttention()
    taken = []  # the decode steps' scratch buffers, all from the workspace
    workspace_get = backend.workspace.get

    def get(*args, **kwargs):
        taken.append(workspace_get(*args, **kwargs))
        return taken[-1]

    backend.workspace.get = get
    for lengths in ((300, 37, 1), (2,), (500, 480, 3, 64), (5, 9)):
        run_steps(backend, 16, torch.float32, lengths)
    assert len(taken) >= 8  # keys and values, each of the four decode steps
    assert backend.workspace.get("keys", (2, 3), torch.float32, CPU).shape == (2, 3)


def test_workspace_keeps_a_buffer_until_a_request_outgrows_it():
    """A buffer is reused for any request that fits in it (a quarter more than first asked for),
    replaced when one does not or asks for another dtype, and kept apart per name."""
    ws = Workspace()
    first = ws.get("keys", (10, 10), torch.float32, CPU)
    for shape in ((10, 10), (5, 2), (125,)):  # fits: the same memory
        assert ws.get("keys", shape, torch.float32, CPU).data_ptr() == first.data_ptr()
    assert ws.get("values", (10, 10), torch.float32, CPU).data_ptr() != first.data_ptr()
    bigger = ws.get("keys", (126,), torch.float32, CPU)
    assert bigger.data_ptr() != first.data_ptr()
    assert ws.get("keys", (126,), torch.float32, CPU).data_ptr() == bigger.data_ptr()
    half = ws.get("keys", (4,), torch.bfloat16, CPU)
    assert half.dtype == torch.bfloat16 and half.shape == (4,)
    assert ws.get("keys", (4,), torch.bfloat16, CPU).data_ptr() == half.data_ptr()


@pytest.mark.parametrize("max_len", [5, 8, 20])
def test_gather_kv_fills_the_buffer_it_is_handed(max_len):
    """Within one block (rows read directly) and across blocks, the gathered K/V are written into
    `empty(shape)`, so the torch backend's decode reuses its workspace instead of allocating."""
    cache = torch.randn(6, 8, HKV, D)
    tables = torch.tensor([[4, 1, 2], [0, 5, 3]], dtype=torch.int32)
    handed = []  # the memory handed out

    def empty(shape):
        buffer = torch.empty(shape)
        handed.append(buffer.data_ptr())
        return buffer

    got = gather_kv(cache, tables, max_len, empty)
    want = torch.stack([cache[t.long()].flatten(0, 1)[:max_len] for t in tables])
    assert torch.equal(got, want) and got.untyped_storage().data_ptr() == handed[0]
    assert torch.equal(gather_kv(cache, tables, max_len), want)  # its own buffer by default


def test_the_cache_hands_its_backend_the_scale_of_its_head_dim():
    """The Triton kernel has no default scale: the cache must pass 1/sqrt(head_dim) itself."""
    seen = []

    class Recording:
        name = "recording"

        def forward(self, q, k, v, k_cache, v_cache, meta, scale):
            seen.append(scale)
            return q

    manager, runner = manager_and_runner(4, 16, 64, 1, Recording(), torch.float32)
    seq = Sequence(0, "0", [0] * 3, 3, 4)
    manager.allocate(seq)
    _, _, meta = runner.prepare([seq], True, manager.block_tables)
    runner.cache.attend(0, torch.zeros(3, H, D), torch.zeros(3, HKV, D), torch.zeros(3, HKV, D), meta)
    assert seen == [D ** -0.5]


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_standin)
    flash_attn_standin.calls.clear()
    return flash_attn_standin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attn_call_site(standin, dtype):
    run_steps(FlashAttention(), 256, dtype, reference_dtype=torch.float32, tolerance=HALF_TOLERANCE[dtype])
    assert standin.calls.count("flash_attn_varlen_func") == 2  # prefill and the chunk
    assert standin.calls.count("flash_attn_with_kvcache") == 1  # decode, appending in place
    run_steps(FlashAttention(), 256, dtype, reference_dtype=torch.float32, tolerance=HALF_TOLERANCE[dtype], scale=0.3)


def test_flash_attn_decode_appends_in_place_and_keeps_seqlens(standin):
    cache_k = torch.zeros(2, 256, HKV, D, dtype=torch.bfloat16)
    cache_v = torch.zeros(2, 256, HKV, D, dtype=torch.bfloat16)
    seqlens = torch.tensor([3, 0], dtype=torch.int32)
    k = torch.randn(2, 1, HKV, D).to(torch.bfloat16)
    standin.flash_attn_with_kvcache(torch.randn(2, 1, H, D).to(torch.bfloat16), cache_k, cache_v, k=k, v=k,
                                    cache_seqlens=seqlens, block_table=torch.tensor([[1], [0]], dtype=torch.int32),
                                    causal=True)
    assert torch.equal(cache_k[1, 3], k[0, 0]) and torch.equal(cache_k[0, 0], k[1, 0])
    assert seqlens.tolist() == [3, 0]


def test_flash_attn_call_sites_refuse_float32_like_the_real_kernel(standin):
    with pytest.raises(RuntimeError, match="only support fp16 and bf16"):
        run_steps(FlashAttention(), 256, torch.float32)


def test_flash_attn_rejects_small_pages_like_the_real_kernel(standin):
    with pytest.raises(RuntimeError, match="divisible by 256"):
        run_steps(FlashAttention(), 16, torch.bfloat16)


def test_backend_selection_errors_here(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        select_backend("flash-attn", CPU, torch.float32, 256, 256)
    with pytest.raises(UsageError, match="triton"):
        select_backend("triton", CPU, torch.float32, 16, 4096)
    with pytest.raises(UsageError, match="choose one of"):
        select_backend("xformers", CPU, torch.float32, 16, 4096)
    assert select_backend("auto", CPU, torch.float32, 16, 4096).name == "torch"


def kvcache_call(**changes):
    """A valid paged decode call to `flash_attn_with_kvcache`, with `changes` to its arguments."""
    bf16, g = torch.bfloat16, torch.Generator().manual_seed(0)
    call = dict(q=torch.randn(2, 1, H, D, generator=g).to(bf16), k_cache=torch.zeros(3, 256, HKV, D, dtype=bf16),
                v_cache=torch.zeros(3, 256, HKV, D, dtype=bf16), k=torch.randn(2, 1, HKV, D, generator=g).to(bf16),
                v=torch.randn(2, 1, HKV, D, generator=g).to(bf16),
                cache_seqlens=torch.tensor([3, 0], dtype=torch.int32),
                block_table=torch.tensor([[2], [0]], dtype=torch.int32), causal=True)
    return lambda: flash_attn_standin.flash_attn_with_kvcache(**(call | changes))


def varlen_call(**changes):
    """A valid paged prefill call to `flash_attn_varlen_func`, with `changes` to its arguments."""
    bf16 = torch.bfloat16
    call = dict(q=torch.randn(5, H, D).to(bf16), k=torch.zeros(3, 256, HKV, D, dtype=bf16),
                v=torch.zeros(3, 256, HKV, D, dtype=bf16), cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 2, 5], dtype=torch.int32), max_seqlen_q=3, max_seqlen_k=3,
                causal=True, block_table=torch.tensor([[2], [0]], dtype=torch.int32))
    return lambda: flash_attn_standin.flash_attn_varlen_func(**(call | changes))


def strided_last_dim(shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]


F32, F16 = torch.float32, torch.float16
REFUSED = {  # what flash-attn refuses: (call, exception, its message)
    "float32": (kvcache_call(q=torch.randn(2, 1, H, D), k_cache=torch.zeros(3, 256, HKV, D),
                             v_cache=torch.zeros(3, 256, HKV, D), k=torch.randn(2, 1, HKV, D),
                             v=torch.randn(2, 1, HKV, D)), RuntimeError, "only support fp16 and bf16"),
    "cache-dtype-differs": (kvcache_call(k_cache=torch.zeros(3, 256, HKV, D, dtype=F16)), RuntimeError,
                            "query and key must have the same dtype"),
    "value-cache-dtype-differs": (kvcache_call(v_cache=torch.zeros(3, 256, HKV, D, dtype=F16)), RuntimeError,
                                  "query and value must have the same dtype"),
    "new-key-dtype-differs": (kvcache_call(k=torch.randn(2, 1, HKV, D).to(F16)), RuntimeError,
                              "Key must have the same dtype as query"),
    "cache-last-dim-strided": (kvcache_call(k_cache=strided_last_dim((3, 256, HKV, D))), AssertionError,
                               "k_cache must have contiguous last dimension"),
    "int64-block-table": (kvcache_call(block_table=torch.tensor([[2], [0]])), RuntimeError,
                          "block_table must have dtype torch.int32"),
    "int64-seqlens": (kvcache_call(cache_seqlens=torch.tensor([3, 0])), RuntimeError,
                      "seqlens_k must have dtype int32"),
    "page-of-16": (kvcache_call(k_cache=torch.zeros(48, 16, HKV, D, dtype=torch.bfloat16),
                                v_cache=torch.zeros(48, 16, HKV, D, dtype=torch.bfloat16)), RuntimeError,
                   "divisible by 256"),
    "leftpad-with-pages": (kvcache_call(cache_leftpad=torch.zeros(2, dtype=torch.int32)), RuntimeError,
                           "Paged KV and leftpad"),
    "varlen-float32": (varlen_call(q=torch.randn(5, H, D), k=torch.zeros(3, 256, HKV, D),
                                   v=torch.zeros(3, 256, HKV, D)), RuntimeError, "only support fp16 and bf16"),
    "varlen-key-dtype-differs": (varlen_call(k=torch.zeros(3, 256, HKV, D, dtype=F16)), RuntimeError,
                                 "query and key must have the same dtype"),
    "varlen-int64-cu-seqlens": (varlen_call(cu_seqlens_k=torch.tensor([0, 2, 5])), RuntimeError,
                                "cu_seqlens_k must have dtype int32"),
    "varlen-page-of-16": (varlen_call(k=torch.zeros(48, 16, HKV, D, dtype=torch.bfloat16),
                                      v=torch.zeros(48, 16, HKV, D, dtype=torch.bfloat16)), RuntimeError,
                          "divisible by 256"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_standin_refuses_what_flash_attn_refuses(case):
    call, error, message = REFUSED[case]
    kvcache_call()()  # the unchanged call is accepted
    varlen_call()()
    with pytest.raises(error, match=message):
        call()


def test_standin_copies_strided_queries_as_flash_attn_does():
    """flash-attn's Python layer makes q, k and v contiguous itself: a strided query is no error."""
    q = strided_last_dim((2, 1, H, D))
    q.copy_(torch.randn(q.shape))
    torch.testing.assert_close(kvcache_call(q=q)(), kvcache_call(q=q.contiguous())(), atol=0, rtol=0)


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


CUDA = torch.device("cuda")
SELECTION_ERRORS = {  # (backend asked for, device, dtype, block size, modules missing, TRITON_INTERPRET): message
    ("flash-attn", CPU, torch.bfloat16, 256, (), None):
        "--attention flash-attn needs a CUDA GPU; use --attention torch here",
    ("flash-attn", CUDA, torch.bfloat16, 256, ("flash_attn",), None):
        "flash-attn is not installed; `pip install flash-attn --no-build-isolation`, or use --attention triton",
    ("flash-attn", CUDA, torch.bfloat16, 16, (), None):
        "flash-attn's paged kernel needs a block size that is a multiple of 256, not 16; use --block-size 256 "
        "or --attention triton",
    ("flash-attn", CUDA, torch.float32, 256, (), None):
        "flash-attn runs in float16 or bfloat16 only; use --dtype bfloat16",
    ("triton", CUDA, torch.bfloat16, 16, ("triton",), None):
        "triton is not installed; `pip install triton`, or use --attention torch",
    ("triton", CPU, torch.float32, 16, (), None):
        "--attention triton needs a CUDA GPU (or TRITON_INTERPRET=1, very slow); use --attention torch here",
    ("triton", CPU, torch.float32, 16, (), "0"):
        "--attention triton needs a CUDA GPU (or TRITON_INTERPRET=1, very slow); use --attention torch here",
    ("xformers", CPU, torch.float32, 16, (), None):
        "unknown --attention 'xformers'; choose one of auto, flash-attn, triton, flex, torch",
}


@pytest.mark.parametrize("case", SELECTION_ERRORS, ids=lambda c: "-".join(map(str, c[:2] + c[4:])))
def test_backend_selection_says_what_to_do_instead(standin, monkeypatch, case):
    name, device, dtype, block_size, missing, interpret = case
    monkeypatch.setattr(backends, "_importable", lambda module: module not in missing)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if interpret is not None:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(UsageError) as e:
        select_backend(name, device, dtype, block_size, block_size)
    assert str(e.value) == SELECTION_ERRORS[case]


def test_backend_selection_takes_what_can_run(standin, monkeypatch):
    """auto picks flash-attn, else Triton, on CUDA; Triton runs on CPU only in its interpreter."""
    monkeypatch.setattr(backends, "_importable", lambda module: module != "flash_attn")
    assert select_backend("auto", CUDA, torch.bfloat16, 256, 256).name == "triton"
    monkeypatch.setattr(backends, "_importable", lambda module: False)
    assert select_backend("auto", CUDA, torch.bfloat16, 256, 256).name == "torch"
    monkeypatch.setattr(backends, "_importable", lambda module: True)
    # Interpreted first: the first TritonAttention imports the kernels, which read TRITON_INTERPRET then.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("triton", CPU, torch.float32, 16, 16).name == "triton"
    assert select_backend("auto", CPU, torch.bfloat16, 256, 256).name == "torch"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert select_backend("triton", CUDA, torch.float32, 16, 16).name == "triton"


def test_benchmark_baseline_is_a_correct_attention():
    """bench/baselines.py keeps the torch backend the speed work replaced, for before/after
    measurements; they only mean something if it computes the same attention."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from baselines import PaddedTorchAttention, PerHeadGqaTorchAttention, SplitKTorchAttention

    for backend in (PaddedTorchAttention, SplitKTorchAttention, PerHeadGqaTorchAttention):
        for block_size in (16, 512):
            run_steps(backend(), block_size, torch.float32)


def test_decode_sdpa_per_head_and_as_rows_are_the_same_attention():
    """The torch backend's decode takes a KV head's query heads as the rows of one query in float32
    and a single-row query per head (`enable_gqa`) otherwise, for speed alone (BENCHMARKS.md,
    changelog): both forms must be the same attention, on K/V laid out as the gather leaves them."""
    batch, context, kv_heads, group, head_dim = 3, 40, 2, 3, 16
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(batch, kv_heads * group, head_dim, generator=gen).to(dtype)
        keys, values = (torch.randn(batch, context, kv_heads, head_dim, generator=gen).to(dtype).transpose(1, 2)
                        for _ in range(2))
        scale = head_dim ** -0.5
        torch.testing.assert_close(attention.sdpa_query_rows(q, keys, values, None, scale),
                                   attention.sdpa_per_head(q, keys, values, None, scale))

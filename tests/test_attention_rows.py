"""The torch backend's decode over the naive twin's preallocated rows, read in place (no gather).

Its output is the gather path's and the float64 reference's whatever rows the batch holds (a
subset of the cache's rows, in any order, of equal or unequal lengths); the engine's naive decode
does not gather when its rows lie together; and the rows a group reads in place are the ones
`plan_decode_groups` promises.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_engine
from row_metadata import decode_meta
from hypothesis import example, given, settings, strategies as st

from pagedllama.engine.sequence import Request
from pagedllama.model import attention
from pagedllama.model.attention import DECODE_MIN_FILL, TorchAttention, plan_decode_groups

H, HKV, D = 12, 4, 16  # the 100M preset's heads (12 over 4 KV heads), a small head dim


def reference(q, k_cache, rows, lens, v_cache, scale):
    """Each query against its row's first `lens` keys, in float64."""
    out = []
    for i, (row, n) in enumerate(zip(rows, lens)):
        k = k_cache[row, :n].double().repeat_interleave(H // HKV, dim=1)
        v = v_cache[row, :n].double().repeat_interleave(H // HKV, dim=1)
        p = (torch.einsum("hd,khd->hk", q[i].double(), k) * scale).softmax(-1)
        out.append(torch.einsum("hk,khd->hd", p, v))
    return torch.stack(out)


@st.composite
def batches(draw):
    """A cache of `num_rows` rows, a batch in some of them in any order, contexts equal or not
    (often nearly equal, so that groups take in several rows)."""
    num_rows = draw(st.integers(1, 12))
    rows = draw(st.permutations(range(num_rows)))[:draw(st.integers(1, num_rows))]
    if draw(st.booleans()):
        lens = [draw(st.integers(1, 40))] * len(rows)
    else:
        base = draw(st.integers(1, 40))
        lens = draw(st.lists(st.one_of(st.integers(1, 40), st.integers(base, base + 3)),
                             min_size=len(rows), max_size=len(rows)))
    return num_rows, rows, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=60, deadline=None)
@given(batch=batches(), seed=st.integers(0, 2 ** 16))
@example(batch=(2, [0, 1], [10, 9]), seed=0)  # one view over its rows in order, the shorter context masked
def test_rows_read_in_place_equal_the_gather_and_the_reference(dtype, batch, seed):
    num_rows, rows, lens = batch
    row_slots = 48
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, num_rows, row_slots, HKV, D, generator=g).to(dtype)
    q = torch.randn(len(rows), H, D, generator=g).to(dtype)
    k = torch.randn(len(rows), HKV, D, generator=g).to(dtype)
    v = torch.randn(len(rows), HKV, D, generator=g).to(dtype)
    outs = {}
    for preallocated in (True, False):  # the same step, read in place, then gathered
        k_cache, v_cache = cache.clone()
        meta = decode_meta(rows, lens, row_slots, preallocated)
        outs[preallocated] = TorchAttention().forward(q, k, v, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(outs[True], outs[False], atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
    want = reference(q, k_cache, rows, lens, v_cache, 0.3)  # the caches as this step wrote them
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6
    torch.testing.assert_close(outs[True].double(), want, atol=tol, rtol=tol)


@settings(max_examples=200, deadline=None)
@given(batch=batches())
def test_a_group_read_in_place_is_its_rows_range_padded_within_the_fill(batch):
    num_rows, rows, lens = batch
    groups = plan_decode_groups(lens, torch.tensor(rows, dtype=torch.int32)[:, None], preallocated_rows=rows)
    for grp in groups:
        members = list(range(len(rows))) if grp.seqs is None else grp.seqs.tolist()
        mine = [rows[i] for i in members]
        span = max(mine) - min(mine) + 1
        assert (grp.view is not None) == (span * DECODE_MIN_FILL <= len(mine))
        if grp.view is None:
            continue
        assert (grp.view.first, grp.view.count) == (min(mine), span)
        seated = list(range(span)) if grp.view.at is None else grp.view.at.tolist()
        assert [grp.view.first + i for i in seated] == mine
        if grp.mask is None:
            assert len({lens[i] for i in members}) == 1
        else:  # members keep their lengths; the range's other rows see every key
            assert grp.mask.shape == (span, 1, 1, grp.max_len)
            seen = grp.mask.sum(-1).flatten().tolist()
            assert [seen[i] for i in seated] == [lens[i] for i in members]
            assert all(n == grp.max_len for i, n in enumerate(seen) if i not in seated)
    if len(set(lens)) == 1 and sorted(rows) == list(range(min(rows), min(rows) + len(rows))):
        assert len(groups) == 1 and groups[0].view is not None  # a dense batch of equal contexts: one view


def test_a_group_takes_in_a_context_that_fills_it_exactly_to_the_bound():
    """Contexts 10 and 8 fill 18 of 2 x 10 padded slots, exactly DECODE_MIN_FILL: one group; 10 and 7
    fall short: two."""
    assert DECODE_MIN_FILL == 0.9
    tables = torch.arange(2, dtype=torch.int32)[:, None]
    assert len(plan_decode_groups([10, 8], tables)) == 1 and len(plan_decode_groups([10, 7], tables)) == 2


def test_plan_without_rows_gathers_every_group():
    """The paged twin (and naive `--reserve pow2 | oracle`): no rows, no views."""
    groups = plan_decode_groups([30, 30, 29, 5], torch.arange(4, dtype=torch.int32)[:, None])
    assert all(g.view is None for g in groups)


@pytest.mark.parametrize("prompt_lens", [(20, 20, 20, 20), (24, 21, 23, 22)], ids=["equal", "close"])
def test_naive_decode_does_not_gather(tiny_model, monkeypatch, prompt_lens):
    """The naive twin's decode reads its rows in place: no K/V gather and no index_select of the
    cache, yet the same tokens as the paged twin (whose decode gathers)."""
    reqs = [Request(str(i), [(7 * i + j) % 300 for j in range(n)], 6) for i, n in enumerate(prompt_lens)]
    calls = {"gather_kv": 0, "index_select of a cache": 0}
    gather, index_select = attention.gather_kv, torch.index_select

    def counting_gather(*a, **kw):
        calls["gather_kv"] += 1
        return gather(*a, **kw)

    def counting_index_select(t, *a, **kw):
        if t.dim() == 4:  # a cache, (rows, slots, Hkv, D)
            calls["index_select of a cache"] += 1
        return index_select(t, *a, **kw)

    monkeypatch.setattr(attention, "gather_kv", counting_gather)
    monkeypatch.setattr(torch, "index_select", counting_index_select)
    paged = make_engine(tiny_model, 16, 40, 128, len(reqs)).run(reqs, progress=False)
    assert calls["gather_kv"] > 0 and calls["index_select of a cache"] > 0  # the counting sees a gather
    calls.update(dict.fromkeys(calls, 0))
    naive = make_engine(tiny_model, 128, len(reqs), 128, len(reqs))
    assert naive.runner.preallocated
    result = naive.run(reqs, progress=False)
    assert calls == {"gather_kv": 0, "index_select of a cache": 0}
    assert [s.output_ids for s in result.sequences] == [s.output_ids for s in paged.sequences]

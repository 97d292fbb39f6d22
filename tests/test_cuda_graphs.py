"""Decode through CUDA graphs' static buffers, checked on CPU: the same padded, full-width,
max-context forward the graphs replay, run eagerly through the Triton kernel's interpreter.
Capture and replay themselves need a GPU (bench/gpu.py checks them there)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
pytest.importorskip("triton")

from conftest import generate, make_engine, random_requests, reference_greedy  # noqa: E402
from pagedllama.model.attention import TorchAttention, TritonAttention  # noqa: E402
from pagedllama.model.cuda_graphs import DecodeGraphs, batch_buckets  # noqa: E402
from pagedllama.model.triton_attention import store_kv  # noqa: E402


@pytest.mark.parametrize("max_batch,expected", [
    (1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (9, [1, 2, 4, 8, 16]), (40, [1, 2, 4, 8, 16, 32, 48]),
])
def test_buckets_hold_every_batch_up_to_the_largest(max_batch, expected):
    buckets = batch_buckets(max_batch)
    assert buckets == expected
    assert all(any(b <= x for x in buckets) for b in range(1, max_batch + 1))


def test_store_kv_writes_each_slot_and_skips_padding():
    cache_k, cache_v = torch.zeros(2, 4, 6, 3, 5)  # (blocks, page, kv heads 3, head dim 5): rows of 15, not 2^k
    k, v = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    slots = torch.tensor([5, -1, 0, 7])
    store_kv(cache_k, cache_v, k, v, slots)
    flat_k, flat_v = cache_k.view(-1, 3, 5), cache_v.view(-1, 3, 5)
    for i in (0, 2, 3):
        assert torch.equal(flat_k[slots[i]], k[i]) and torch.equal(flat_v[slots[i]], v[i])
    untouched = [s for s in range(8) if s not in (5, 0, 7)]
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


@pytest.mark.parametrize("block_size,num_blocks", [(16, 12), (16, 4), (64, 3)], ids=["ample", "preempting", "naive"])
def test_static_buffer_decode_equals_reference(tiny_model, block_size, num_blocks):
    """Batches that shrink as requests finish run in their bucket of the static buffers, with the
    block tables at full width: tokens equal the reference and the eager kernel's, also when a
    request is preempted and recomputed. Block 64 = max_seq_len is the naive twin's layout."""
    requests = random_requests([(15, 6), (15, 5), (31, 4)], tiny_model.args.vocab_size, seed=3)
    expected = [reference_greedy(tiny_model, r.prompt_ids, r.max_new_tokens) for r in requests]
    engine = make_engine(tiny_model, block_size, num_blocks, 64, len(requests), TritonAttention(), cuda_graphs=True)
    assert isinstance(engine.runner.graphs, DecodeGraphs) and engine.runner.graphs.buckets == [1, 2, 3]
    out = [s.output_ids for s in engine.run(requests, progress=False).sequences]
    assert out == expected
    eager, _ = generate(make_engine(tiny_model, block_size, num_blocks, 64, len(requests), TritonAttention()),
                        requests)
    assert out == eager
    assert engine.scheduler.stats.preemptions > 0 if num_blocks == 4 else engine.scheduler.stats.preemptions == 0


def test_padding_rows_leave_the_cache_alone(tiny_model):
    """A batch of 3 in the bucket of 4: the fourth row writes no K/V and attends to nothing."""
    requests = random_requests([(5, 3), (9, 3), (2, 3)], tiny_model.args.vocab_size, seed=4)
    engine = make_engine(tiny_model, 16, 8, 64, 5, TritonAttention(), cuda_graphs=True)
    runner, graphs = engine.runner, engine.runner.graphs
    assert graphs.buckets == [1, 2, 4, 5]
    engine.add(requests)
    engine.step()  # prefill: 3 blocks in use
    batch, is_prefill = engine.scheduler.schedule()
    assert not is_prefill and len(batch) == 3
    cache, buffers = runner.cache, runner.decode_buffers
    before = cache.kv.clone()
    logits, _ = runner.run(batch, is_prefill, engine.block_manager.take_ops(), engine.block_manager.block_tables)
    assert logits.shape == (3, tiny_model.args.vocab_size)
    written = {int(s) for s in buffers.slot_mapping[:3]}
    changed = (cache.kv != before).view(2 * tiny_model.args.n_layers, 8 * 16, -1).any(-1).any(0)  # per slot
    changed_slots = {int(s) for s in changed.nonzero().flatten()}
    assert changed_slots == written
    assert torch.equal(buffers.slot_mapping[3:4], torch.tensor([-1])) and buffers.context_lens[3] == 0


def test_only_the_triton_backend_is_captured(tiny_model):
    with pytest.raises(ValueError, match="triton"):
        make_engine(tiny_model, 16, 4, 64, 2, TorchAttention(), cuda_graphs=True)

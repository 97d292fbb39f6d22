"""Both twins against the no-cache forward pass, token for token (greedy, float32).

`full_forward` (tests/full_forward.py) shares RoPE, RMSNorm and the FFN with the cached path, so these tests
show that cached equals uncached over any workload and pool: a fast second opinion. That the model
is Llama 3 is checked against the independent float64 reference (test_reference.py,
test_engine_reference.py).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import TINY, generate, make_engine, random_requests, reference_greedy
from pagedllama.engine.sampling import SamplingParams
from pagedllama.engine.sequence import Request
from pagedllama.io.checkpoint import build_model, random_state_dict

SLOT = TINY.kv_bytes_per_token(4)  # float32

# Prompts from 1 to 300 tokens, answers from 1 to 60: lengths that differ widely.
LENGTHS = [(1, 40), (300, 5), (37, 60), (5, 1), (129, 33), (16, 16)]
MAX_SEQ_LEN = 512


@pytest.fixture(scope="module")
def requests(tiny_model):
    return random_requests(LENGTHS, tiny_model.args.vocab_size)


@pytest.fixture(scope="module")
def expected(tiny_model, requests):
    return [reference_greedy(tiny_model, r.prompt_ids, r.max_new_tokens) for r in requests]


def test_naive_equals_reference(tiny_model, requests, expected):
    engine = make_engine(tiny_model, MAX_SEQ_LEN, len(requests), MAX_SEQ_LEN, len(requests))
    assert engine.runner.cache.k[0].shape == (len(requests), MAX_SEQ_LEN, 2, 16)  # (batch, max_seq_len, kv_heads, head_dim)
    out, _ = generate(engine, requests)
    assert out == expected


@pytest.mark.parametrize("block_size", [1, 16, 256])
def test_paged_equals_reference(tiny_model, requests, expected, block_size):
    num_blocks = 2 * MAX_SEQ_LEN * len(requests) // block_size
    out, engine = generate(make_engine(tiny_model, block_size, num_blocks, MAX_SEQ_LEN, len(requests)), requests)
    assert out == expected
    assert engine.scheduler.stats.fits_in_memory
    assert engine.block_manager.allocator.num_free == num_blocks  # every block back in the pool


def test_scattered_blocks_equal_reference(tiny_model, requests, expected):
    """Physical blocks handed out in a shuffled order: tables point all over the pool."""
    engine = make_engine(tiny_model, 8, 400, MAX_SEQ_LEN, len(requests))
    order = torch.randperm(400, generator=torch.Generator().manual_seed(3)).tolist()
    engine.block_manager.allocator._free.clear()
    engine.block_manager.allocator._free.extend(order)
    out, _ = generate(engine, requests)
    assert out == expected


def test_twins_agree_in_bfloat16(requests):
    """In bfloat16 there is no exact reference, but the two layouts hold the same K/V and attention
    sees them in the same groups and shapes: the twins' tokens are identical, as in float32."""
    model = build_model(TINY, random_state_dict(TINY, seed=1), torch.device("cpu"), torch.bfloat16, 1024)
    naive, _ = generate(make_engine(model, MAX_SEQ_LEN, len(requests), MAX_SEQ_LEN, len(requests),
                                    dtype=torch.bfloat16), requests)
    for block_size in (1, 16):
        engine = make_engine(model, block_size, 2 * MAX_SEQ_LEN * len(requests) // block_size, MAX_SEQ_LEN,
                             len(requests), dtype=torch.bfloat16)
        assert generate(engine, requests)[0] == naive


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
@pytest.mark.parametrize("block_size,num_blocks", [(4, 95), (16, 24), (1, 380), (4, 77)])
def test_heavy_preemption_equals_reference(tiny_model, requests, expected, block_size, num_blocks, preemption):
    """A pool only a little larger than the longest request (305 tokens): requests must take turns
    (with 77 blocks of 4, a running request is preempted, by recompute or swap)."""
    engine = make_engine(tiny_model, block_size, num_blocks, MAX_SEQ_LEN, len(requests), preemption=preemption,
                         swap_space_bytes=2 * num_blocks * block_size * SLOT)
    out = [s.output_ids for s in engine.run(requests, progress=False).sequences]
    assert out == expected
    stats = engine.scheduler.stats
    assert stats.preemptions > 0 or not stats.fits_in_memory
    assert (stats.swaps > 0) == (preemption == "swap" and stats.preemptions > 0)
    assert engine.block_manager.allocator.num_free == num_blocks
    assert engine.block_manager.num_cached_tokens == 0


def test_sampling_is_batch_invariant(tiny_model, requests):
    """With a seed, a request samples the same tokens alone as in a batch."""
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    batched, _ = generate(make_engine(tiny_model, 16, 200, MAX_SEQ_LEN, len(requests), sampling=params), requests)
    alone, _ = generate(make_engine(tiny_model, 16, 200, MAX_SEQ_LEN, 2, sampling=params), requests[2:3])
    greedy, _ = generate(make_engine(tiny_model, 16, 200, MAX_SEQ_LEN, 2), requests[2:3])
    assert alone[0] == batched[2]
    assert greedy[0] != batched[2]  # the sampled path really is not the greedy one


def test_first_argmax_picks_the_first_maximum_like_torch():
    """Greedy picks go through numpy on CPU (faster); they must be torch's argmax, ties included."""
    from pagedllama.engine.sampling import first_argmax

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, generator=gen)
    x[3, [5, 17, 299]] = 10.0  # a three-way tie: the first wins
    x[7] = 0.0  # all equal
    with torch.inference_mode():  # as the model's logits are
        y = x.clone()
        picks = first_argmax(y)
    assert picks.dtype == torch.int64
    assert torch.equal(picks, x.argmax(-1))
    assert picks[3] == 5 and picks[7] == 0


def test_a_request_stops_at_the_context_length(tiny_model):
    """A request asking for more tokens than its context holds ends at `max_seq_len` tokens."""
    engine = make_engine(tiny_model, 4, 16, 32, 1)
    seq, = engine.run(random_requests([(10, 100)], tiny_model.args.vocab_size), progress=False).sequences
    assert seq.finish_reason == "max_seq_len" and seq.num_tokens == 32


def blocks_of(request: Request, block_size: int) -> int:
    """Blocks one of the request's sequences holds at its longest."""
    return -(-(len(request.prompt_ids) + request.max_new_tokens) // block_size)


@st.composite
def workloads(draw):
    """A few requests whose prompts may share a prefix (so prefix caching finds blocks), each with
    its own answer length and number of parallel samples."""
    vocab = TINY.vocab_size
    prefix = draw(st.lists(st.integers(0, vocab - 1), max_size=40))
    reqs = []
    for i in range(draw(st.integers(1, 5))):
        suffix = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=30))
        reqs.append(Request(f"r{i}", prefix + suffix, draw(st.integers(1, 12)), n=draw(st.sampled_from([1, 1, 2]))))
    return reqs


@pytest.mark.parametrize("twin,preemption", [("naive", "recompute"), ("paged", "recompute"), ("paged", "swap")])
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=workloads(), data=st.data())
def test_any_workload_and_pool_equal_reference(tiny_model, twin, preemption, reqs, data):
    """Whatever the requests, block size, pool size (down to one that holds only the longest request,
    so requests wait and are preempted), preemption mode and prefix caching: every greedy sample is
    the full-recompute reference, and every block goes back to the pool."""
    max_seq_len = 128
    seqs = sum(r.n for r in reqs)
    if twin == "naive":  # one max_seq_len row per sequence; fewer rows than sequences make requests wait
        block_size, num_blocks = max_seq_len, data.draw(st.integers(max(r.n for r in reqs), seqs), label="rows")
    else:
        block_size = data.draw(st.sampled_from([1, 2, 3, 5, 8, 16]), label="block_size")
        blocks = [r.n * blocks_of(r, block_size) for r in reqs]  # unshared
        fewest, need = max(blocks), sum(blocks)
        num_blocks = data.draw(st.one_of(st.integers(fewest, fewest + 3), st.integers(fewest, need + 2)),
                               label="num_blocks")  # often tight: preemption
    # a swap pool too small for a request falls back to recompute
    swap_blocks = data.draw(st.one_of(st.just(num_blocks), st.integers(0, num_blocks)), label="swap_blocks")
    engine = make_engine(tiny_model, block_size, num_blocks, max_seq_len, seqs, preemption=preemption,
                         swap_space_bytes=swap_blocks * block_size * SLOT,
                         prefix_caching=twin == "paged" and data.draw(st.booleans(), label="prefix_caching"))
    cache = engine.block_manager
    outputs = [s.output_ids for s in engine.run(reqs, progress=False).sequences]
    expected = [reference_greedy(tiny_model, r.prompt_ids, r.max_new_tokens) for r in reqs for _ in range(r.n)]
    assert outputs == expected
    assert cache.allocator.num_free == num_blocks and cache.allocator.num_refs == 0
    stats = engine.scheduler.stats  # what the example exercised (pytest --hypothesis-show-statistics)
    event(f"preempted: {stats.preemptions > 0}, swapped: {stats.swaps > 0}, copied on write: {cache.num_copies > 0}")
    if cache.prefix_cache:
        event(f"prefix cache hit: {cache.prefix_cache.hit_tokens > 0}")


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=workloads(), data=st.data())
def test_sampling_and_beams_do_not_depend_on_the_pool(tiny_model, preemption, reqs, data):
    """Sampled tokens (each sample drawing from its own random stream) and beam search come out the
    same from a pool that holds everything at once and from a tight one, where requests wait, are
    preempted (by recompute or swap) and may find their prefix cached."""
    if data.draw(st.booleans(), label="beams"):
        reqs = [Request(r.request_id, r.prompt_ids, r.max_new_tokens, beam_width=r.n + 1) for r in reqs]
    block_size = data.draw(st.sampled_from([1, 3, 16]), label="block_size")
    seqs = sum(r.width for r in reqs)
    blocks = [r.width * blocks_of(r, block_size) for r in reqs]
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=data.draw(st.integers(0, 9), label="seed"))

    def run(num_blocks: int, **engine_args) -> list[list[int]]:
        engine = make_engine(tiny_model, block_size, num_blocks, 128, seqs, sampling=sampling, **engine_args)
        out = [s.output_ids for s in engine.run(reqs, progress=False).sequences]
        assert engine.block_manager.allocator.num_free == num_blocks
        if engine_args:
            event(f"preempted: {engine.scheduler.stats.preemptions > 0}, swapped: {engine.scheduler.stats.swaps > 0}")
        return out

    tight = data.draw(st.integers(max(blocks), max(blocks) + 3), label="tight_blocks")
    swap_bytes = tight * block_size * SLOT  # the default 4 GB is slow to set up
    assert run(sum(blocks) + 1) == run(tight, preemption=preemption, swap_space_bytes=swap_bytes,
                                       prefix_caching=data.draw(st.booleans()))

"""Beam search on shared blocks against a plain beam search that recomputes every beam."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import TINY, make_engine, random_requests
from full_forward import full_forward
from pagedllama.engine.beam_search import best_continuations
from pagedllama.engine.sharing import one_per_sequence

WIDTH, STEPS = 3, 6
SLOT = TINY.kv_bytes_per_token(4)


def reference_beam_search(model, prompt: list[int], stop: set[int]) -> list[tuple[float, list[int]]]:
    """(cumulative log-prob, output tokens) of the best WIDTH hypotheses; no cache, no sharing."""
    live, done = [(0.0, [])], []
    for _ in range(STEPS):
        candidates = []
        for score, out in live:
            logprobs = full_forward(model, torch.tensor([prompt + out]))[0, -1].log_softmax(-1).tolist()
            candidates += [(score + lp, out + [t]) for t, lp in enumerate(logprobs)]
        best = sorted(candidates, key=lambda c: -c[0])[:WIDTH]
        done += [c for c in best if c[1][-1] in stop]
        live = [c for c in best if c[1][-1] not in stop]
        if not live:
            break
    return sorted(done + live, key=lambda c: -c[0])[:WIDTH]


@pytest.fixture(scope="module")
def case(tiny_model):
    """Two requests, and a stop token that ends one of the beams early."""
    requests = [replace(r, beam_width=WIDTH) for r in random_requests([(9, STEPS), (14, STEPS)], TINY.vocab_size,
                                                                       seed=8)]
    stop = {reference_beam_search(tiny_model, requests[0].prompt_ids, set())[1][1][2]}
    expected = [reference_beam_search(tiny_model, r.prompt_ids, stop) for r in requests]
    assert any(len(out) < STEPS for hyps in expected for _, out in hyps), "the stop token ends a beam"
    return requests, stop, expected


def beam_search(model, pool: tuple[int, int, int], requests, stop, **options):
    """`pool`: (block size, blocks, block-table rows); stops at `stop` tokens."""
    engine = make_engine(model, pool[0], pool[1], 32, pool[2], stop_ids=frozenset(stop), ignore_eos=False, **options)
    streamed = []
    sequences = engine.run(requests, progress=False, on_finish=streamed.append).sequences
    assert sorted(s.seq_id for s in streamed) == sorted(s.seq_id for s in sequences), "only the final beams stream"
    return sequences, engine


def check(sequences, expected):
    assert [s.output_ids for s in sequences] == [out for hyps in expected for _, out in hyps]
    assert [s.cum_logprob for s in sequences] == pytest.approx([sc for hyps in expected for sc, _ in hyps], abs=1e-4)


@pytest.mark.parametrize("twin", ["paged", "naive"])
def test_beam_search_equals_reference(tiny_model, case, twin):
    requests, stop, expected = case
    rows = len(one_per_sequence(requests))
    block_size, num_blocks = (4, 40) if twin == "paged" else (32, rows)
    sequences, engine = beam_search(tiny_model, (block_size, num_blocks, rows), requests, stop)
    cache = engine.block_manager
    check(sequences, expected)
    assert cache.allocator.num_free == num_blocks and cache.num_cached_tokens == 0, "pruned beams gave blocks back"
    sharing = engine.sharing.summary(engine.memory.summary(0), 1, WIDTH)
    assert (sharing["saved_bytes"] > 0) == (twin == "paged") and cache.num_copies > 0


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_beam_search_under_preemption_equals_reference(tiny_model, case, preemption):
    requests, stop, expected = case
    sequences, engine = beam_search(tiny_model, (2, 16, len(one_per_sequence(requests))), requests, stop,
                                    preemption=preemption, swap_space_bytes=100 * 2 * SLOT)
    cache = engine.block_manager
    check(sequences, expected)
    assert engine.scheduler.stats.preemptions > 0 and cache.allocator.num_free == 16


def test_best_continuations_rank_all_beams_together():
    scores = torch.tensor([0.0, -1.0])
    logprobs = torch.tensor([[-3.0, -0.5, -2.0], [-0.1, -4.0, -0.2]])
    assert best_continuations(scores, logprobs, 3) == [(0, 1, -0.5), (1, 0, -1.100000023841858),
                                                       (1, 2, -1.2000000476837158)]

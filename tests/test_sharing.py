"""Parallel sampling: n samples share the prompt's blocks, copy on write, and sample as if alone."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from conftest import TINY, generate, make_engine, random_requests
from pagedllama.app import cli
from pagedllama.engine.sampling import SamplingParams
from pagedllama.engine.sequence import Request
from pagedllama.engine.sharing import SharingTracker, one_per_sequence

SLOT = TINY.kv_bytes_per_token(4)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=7)


def run(model, pool: tuple[int, int, int, int], requests, sampling=SamplingParams(), **options):
    """`pool`: (block size, blocks, max_seq_len, block-table rows)."""
    engine = make_engine(model, *pool, sampling=sampling, **options)
    return [s.output_ids for s in engine.run(requests, progress=False).sequences], engine


@pytest.mark.parametrize("twin", ["paged", "naive"])
def test_each_sample_equals_that_sample_run_alone(tiny_model, twin):
    requests = [replace(r, n=3) for r in random_requests([(9, 12), (14, 10)], TINY.vocab_size, seed=2)]
    block_size, num_blocks = (4, 60) if twin == "paged" else (64, 6)
    together, engine = run(tiny_model, (block_size, num_blocks, 64, len(one_per_sequence(requests))), requests, SAMPLED)
    cache = engine.block_manager
    alone = [run(tiny_model, (4, 60, 64, 1), [replace(r, n=1, sample_index=j)], SAMPLED)[0][0]
             for r in requests for j in range(3)]
    assert together == alone
    assert len({tuple(o) for o in together[:3]}) == 3, "a request's samples differ"
    assert cache.num_copies >= 4 and cache.allocator.num_free == num_blocks and cache.num_cached_tokens == 0


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_greedy_samples_under_preemption_equal_unconstrained_run(tiny_model, preemption):
    """Samples are preempted together; recomputed, they share their common prefix again."""
    requests = [replace(r, n=2) for r in random_requests([(20, 30), (30, 25), (10, 30), (5, 20)], TINY.vocab_size,
                                                          seed=5)]
    out, engine = run(tiny_model, (4, 30, 128, 8), requests, preemption=preemption, swap_space_bytes=1000 * 4 * SLOT)
    cache = engine.block_manager
    alone = [replace(r, n=1) for r in requests]
    expected = generate(make_engine(tiny_model, 4, 200, 128, len(requests)), alone)[0]
    assert out == [e for e in expected for _ in range(2)]
    assert engine.scheduler.stats.preemptions > 0
    assert cache.allocator.num_free == 30 and cache.num_cached_tokens == 0


@pytest.mark.parametrize("twin", ["paged", "naive"])
def test_memory_saved_by_sharing_hand_count(twin):
    """Prompt of 10 tokens, 3 samples of 2 tokens, blocks of 4 (paged) or one 64-slot row (naive).

    Paged: the prefill fills blocks 0, 1 and 2 (2 tokens in block 2); the samples fork and all
    write into block 2 next, so two of them copy it: 5 blocks at peak, where three independent
    copies would hold 9. Holding: 8 (blocks 0, 1) + 3 x 3 (block 2 and its copies) = 17 slots.
    Naive: each sample ends up with a whole row of its own, as three copies would: no saving,
    and each row holds all 11 tokens (33 slots).
    """
    block_size = 4 if twin == "paged" else 64
    engine = make_engine(None, block_size, 20 if twin == "paged" else 3, 64, 3)
    cache = engine.block_manager
    engine.run([Request("r", list(range(10)), 2, n=3)], progress=False)
    memory = engine.memory.summary(0)
    sharing = engine.sharing.summary(memory, 3, 1)
    blocks, unshared, holding = (5, 9, 17) if twin == "paged" else (3, 3, 33)
    assert memory["peak_reserved_bytes"] == blocks * block_size * SLOT
    assert sharing["unshared_peak_bytes"] == unshared * block_size * SLOT
    assert sharing["saved_bytes"] == (unshared - blocks) * block_size * SLOT
    assert memory["peak_used_bytes"] == holding * SLOT and cache.num_copies == 2


def test_samples_still_fork_when_a_one_sample_request_is_added_later():
    """`Engine.add` twice: the second call's single-sample request must not turn off forking."""
    engine = make_engine(None, 4, 40, 64, 4)
    sampled, single = engine.add([Request("r0", list(range(6)), 3, n=3)])[0], engine.add([Request("r1", [1], 3)])[0]
    while not engine.scheduler.done:
        engine.step()
    assert len(sampled.outputs()) == 3 and len(single.outputs()) == 1


def test_sharing_keeps_the_peak_over_steps_not_the_last_step():
    tracker = SharingTracker()
    for table_blocks in (3, 9, 4):
        tracker.record(table_blocks)
    assert tracker.peak_table_blocks == 9


@pytest.mark.parametrize("flag,shown", [("--n", "n 3, beam width 1"), ("--beam-width", "n 1, beam width 3")])
def test_cli_twins_side_by_side_with_samples(tmp_path, capsys, flag, shown):
    """The naive twin preallocates a full row per sample or beam; the paged one shares the prompt."""
    data, docs = tmp_path / "short.json", {}
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"Question {i}: why is the sky blue?"}]}
                                for i in range(2)]))
    for twin in ("naive", "paged"):
        path = tmp_path / f"{twin}.json"
        code = cli.main(twin, ["2", "--data", str(data), flag, "3", "--max-new-tokens", "3", "--kv-cache-gb", "0.5",
                               "--no-progress", "--no-answers", "--json", str(path)])
        assert code == 0 and f"sharing ({shown})" in capsys.readouterr().out
        docs[twin] = json.loads(path.read_text())
        assert docs[twin]["dtype"] == "float32"  # --dtype auto on CPU
    for doc in docs.values():  # each output says which sample or beam it is
        answers = doc["requests"]
        assert [a["id"] for a in answers] == ["#0"] * 3 + ["#1"] * 3
        if flag == "--n":
            assert [a["sample_index"] for a in answers] == [0, 1, 2] * 2
        else:
            assert [a["beam_index"] for a in answers] == [0, 1, 2] * 2
            scores = [a["cumulative_logprob"] for a in answers]
            assert scores[:3] == sorted(scores[:3], reverse=True) and scores[3:] == sorted(scores[3:], reverse=True)
        assert all(len(a["output_token_ids"]) == a["output_tokens"] for a in answers)
    naive, paged = docs["naive"]["sharing"], docs["paged"]["sharing"]
    assert naive["saved_bytes"] == 0 < paged["saved_bytes"]
    assert paged["saved_fraction"] == pytest.approx(paged["saved_bytes"] / paged["unshared_peak_bytes"])
    assert naive["peak_reserved_bytes"] == 6 * 4096 * docs["naive"]["memory"]["bytes_per_token"]
    assert paged["peak_reserved_bytes"] < naive["peak_reserved_bytes"] / 10
    assert cli.main("paged", ["2", flag, "3", "--simulate", "llama3-8b", "--gpu-memory-gb", "24"]) == 2
    assert "apply to generation" in capsys.readouterr().err

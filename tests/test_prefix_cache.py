"""Prefix caching: same outputs, the hit rate a hand count predicts, LRU eviction, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, dry_step, make_engine, new_group
from pagedllama.app import cli
from pagedllama.engine.block_manager import BlockManager
from pagedllama.engine.config import CacheLayout
from pagedllama.engine.prefix_cache import ROOT
from pagedllama.engine.scheduler import Scheduler
from pagedllama.engine.sequence import Request, Sequence

SLOT = TINY.kv_bytes_per_token(4)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(model, pool: tuple[int, int, int, int], requests, **options):
    """`pool`: (block size, blocks, max_seq_len, block-table rows)."""
    engine = make_engine(model, *pool, **options)
    return [s.output_ids for s in engine.run(requests, progress=False).sequences], engine


def test_hit_rate_equals_hand_count_and_outputs_do_not_change(tiny_model):
    """Blocks of 4; S is an 8-token prefix (2 full blocks). All four are admitted in one step.

    A = S + 3 tokens: nothing cached yet, 0 hits.  B = S + 5: both S blocks, 8.
    C = S alone: its second block holds its last token, whose logits are needed: 4.
    D = A again: the block with its last token is A's partial one: 8.  20 of 43 tokens.
    """
    s = tokens(8, 1)
    prompts = [s + tokens(3, 2), s + tokens(5, 3), s, s + tokens(3, 2)]
    requests = [Request(f"r{i}", p, 6) for i, p in enumerate(prompts)]
    out, engine = run(tiny_model, (4, 40, 64, 4), requests, prefix_caching=True)
    assert engine.block_manager.prefix_cache.summary() == {"hit_rate": 20 / 43, "cached_tokens": 20, "prompt_tokens": 43}
    assert out == run(tiny_model, (4, 40, 64, 4), requests)[0]
    assert engine.sharing.peak_table_blocks - engine.memory.peak_blocks == 5  # B 2, C 1, D 2 blocks shared


def test_freed_blocks_stay_cached_and_are_evicted_least_recently_used_first():
    cache = BlockManager(CacheLayout(4, 8), 64, 4)
    cache.enable_prefix_caching()

    def admit(prompt: list[int]) -> Sequence:
        seq = Sequence(0, "r", prompt, len(prompt), 1)
        assert cache.can_allocate(seq)
        cache.allocate(seq)
        cache.commit([seq], is_prefill=True)
        return seq

    x, y = admit(tokens(9, 1)), admit(tokens(9, 2))  # blocks 0-2 and 3-5; 2 full ones each
    cache.free(x)
    cache.free(y)
    assert cache.allocator.num_free == 8 and cache.num_cached_tokens == 0
    assert cache.prefix_cache.lookup(x) == [0, 1] and cache.prefix_cache.lookup(y) == [3, 4]
    w = admit(tokens(16, 3))  # takes the 2 never-used blocks, then x's, last block first
    assert w.block_table == [6, 7, 2, 1]
    assert cache.prefix_cache.lookup(x) == [0] and cache.prefix_cache.lookup(y) == [3, 4]
    again = admit(list(y.token_ids))  # y's cached blocks come back into use, holding their tokens
    assert again.block_table[:2] == [3, 4] and again.num_cached_tokens == 9
    assert cache.num_cached_tokens == 16 + 9 and cache.allocator.num_used == 4 + 3


def test_admission_counts_cached_blocks_in_use_as_already_there():
    """Blocks of 4, a pool of 4: A (12 tokens) holds 3. B shares A's first 8 tokens, whose 2 blocks
    are cached and in use: B needs only 1 more block, which is free, so B is admitted."""
    cache = BlockManager(CacheLayout(4, 4), 64, 4)
    cache.enable_prefix_caching()
    a = Sequence(0, "a", tokens(12, 1), 12, 4)
    b = Sequence(1, "b", a.token_ids[:8] + tokens(4, 2), 12, 4)
    cache.allocate(a)
    assert cache.allocator.num_free == 1 and cache.can_allocate(b)
    cache.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and cache.allocator.num_free == 0


def test_a_block_filled_by_a_decode_step_is_found_by_the_next_admission():
    """Blocks of 4: a 7-token prompt's decode step writes token 8, filling its second block. A
    request arriving right after, with those 8 tokens and one more, finds both blocks."""
    cache = BlockManager(CacheLayout(4, 8), 64, 2)
    cache.enable_prefix_caching()
    scheduler = Scheduler(cache, watermark=0)
    first = new_group(scheduler, 7, 4).seqs[0]
    dry_step(scheduler)
    dry_step(scheduler)
    assert first.num_cached_tokens == 8
    seq = Sequence(next(scheduler.seq_ids), "next", first.token_ids[:8] + [1], 9, 1)
    assert cache.prefix_cache.lookup(seq) == first.block_table[:2]


def test_a_hash_collision_is_never_a_hit():
    """Python hashes an int modulo 2**61 - 1, so token t and t + 2**61 - 1 collide, as do keys made
    of them. A request whose first block collides with a cached one, and whose second block equals
    the cached second block, finds nothing: the tokens are compared, not only their hashes."""
    cache = BlockManager(CacheLayout(4, 8), 64, 4)
    cache.enable_prefix_caching()
    cached = Sequence(0, "a", tokens(9, 1), 9, 1)
    cache.allocate(cached)
    cache.commit([cached], is_prefill=True)
    other = list(cached.token_ids)
    other[0] += 2**61 - 1
    assert hash((ROOT, tuple(other[:4]))) == hash((ROOT, tuple(cached.token_ids[:4])))
    assert cache.prefix_cache.lookup(Sequence(1, "b", other, 9, 1)) == []
    same_start = cached.token_ids[:4] + [t + 1 for t in cached.token_ids[4:]]
    assert cache.prefix_cache.lookup(Sequence(2, "c", same_start, 9, 1)) == cached.block_table[:1]
    assert cache.prefix_cache.lookup(Sequence(3, "d", list(cached.token_ids), 9, 1)) == cached.block_table[:2]


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_prefix_caching_under_preemption_equals_unconstrained_run(tiny_model, preemption):
    prefix = tokens(13, 4)
    requests = [Request(f"r{i}", prefix + tokens(p, 10 + i), n)
                for i, (p, n) in enumerate([(7, 30), (20, 25), (2, 30), (9, 20), (0, 15)])]
    out, engine = run(tiny_model, (4, 20, 128, len(requests)), requests, prefix_caching=True, preemption=preemption,
                      swap_space_bytes=1000 * 4 * SLOT)
    cache = engine.block_manager
    assert out == run(tiny_model, (4, 200, 128, len(requests)), requests)[0]
    assert engine.scheduler.stats.preemptions > 0 and engine.block_manager.prefix_cache.hit_rate > 0
    assert cache.allocator.num_free == 20 and cache.num_cached_tokens == 0


def test_cli_system_prompt_shows_hits_on_sharegpt(tmp_path, capsys):
    path = tmp_path / "run.json"
    code = cli.main("paged", ["3", "--enable-prefix-caching", "--system-prompt", "You are a helpful assistant. "
                              "Answer clearly and briefly, and say so when you are not sure.", "--max-new-tokens",
                              "2", "--no-progress", "--no-answers", "--json", str(path)])
    out = capsys.readouterr().out
    doc = json.loads(path.read_text())
    assert code == 0 and "prefix cache: hit rate" in out and "sharing (n 1, beam width 1, prefix caching)" in out
    assert 0 < doc["prefix_cache"]["hit_rate"] < 1 and doc["sharing"]["saved_bytes"] > 0

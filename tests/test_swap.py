"""Swap preemption: K/V to the CPU pool and back bit for bit, its order, its fallback, dry runs."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import CPU, TINY, dry_step, generate, make_engine, new_group, random_requests
from pagedllama.app import cli
from pagedllama.engine.block_manager import BlockManager
from pagedllama.engine.config import CacheLayout, EngineConfig
from pagedllama.engine.scheduler import Scheduler
from pagedllama.engine.sequence import Status
from pagedllama.engine.swap import SwapSpace
from pagedllama.model.kv_cache import KVCache

SLOT = TINY.kv_bytes_per_token(4)
# Requests that outgrow a 16-block pool of 4 slots while decoding: running ones are preempted.
LENGTHS = [(20, 30), (30, 25), (10, 30), (5, 20)]


def test_swap_round_trip_restores_kv_bit_for_bit():
    cache = BlockManager(CacheLayout(4, 12), 64, 4)
    kv = KVCache(TINY, cache.layout, None, CPU, torch.float32, swap_blocks=5)  # the runner's tensors
    swap = SwapSpace(cache, 5)
    scheduler = Scheduler(cache, watermark=0, swap=swap)
    new_group(scheduler, 10, 5)
    b = new_group(scheduler, 7, 5)
    dry_step(scheduler)
    scheduler.fork(b.seqs[0], sample_key=1)  # b's two sequences share both of b's blocks
    kv.kv.copy_(torch.randn_like(kv.kv))
    before = kv.kv[:, :, b.seqs[0].block_table].clone()
    scheduler.preempt(b)
    kv.apply(cache.take_ops())  # as the runner does before the next forward pass
    assert swap.allocator.num_used == 2, "shared blocks are swapped once"
    assert all(s.status is Status.SWAPPED and s.row == -1 and not s.block_table for s in b.seqs)
    assert cache.allocator.num_used == 3 and cache.num_cached_tokens == 10  # the other request's alone
    kv.kv.zero_()  # the freed blocks get overwritten
    swap.swap_in(b.seqs)
    kv.apply(cache.take_ops())
    first, second = b.seqs
    assert first.block_table == second.block_table and first.num_cached_tokens == 7
    assert all(cache.allocator.ref_counts[blk] == 2 for blk in first.block_table)
    assert torch.equal(kv.kv[:, :, first.block_table], before)
    assert cache.block_tables[second.row, :2].tolist() == second.block_table
    assert swap.allocator.num_free == swap.allocator.num_blocks and cache.num_cached_tokens == 17


def test_a_bfloat16_swap_pool_holds_as_many_blocks_as_its_bytes_allow():
    """Slots of bf16 K/V take half the bytes of float32 ones: the same bytes hold twice the blocks."""
    for dtype, blocks in ((torch.float32, 5), (torch.bfloat16, 10)):
        config = EngineConfig("paged", TINY, 64, dtype, CPU, 4, preemption="swap", swap_space_bytes=5 * 4 * SLOT)
        layout = CacheLayout(4, 12)
        assert config.bytes_per_slot == TINY.kv_bytes_per_token(torch.finfo(dtype).bits // 8)
        swap = SwapSpace(BlockManager(layout, 64, 4), config.swap_blocks(layout))
        kv = KVCache(TINY, layout, None, CPU, dtype, config.swap_blocks(layout))
        assert swap.allocator.num_blocks == blocks == kv.swap_kv.shape[2] and kv.swap_kv.dtype == dtype


def test_swapped_request_resumes_before_new_admissions():
    """Blocks of 4, a pool of 9. `old` runs 3 samples; when all three need a new block at once,
    `young` (5 blocks) is swapped out and 2 blocks stay free: room for `late`, not for `young`."""
    cache = BlockManager(CacheLayout(4, 9), 64, 4)
    scheduler = Scheduler(cache, watermark=0, swap=SwapSpace(cache, 100))
    old, young = new_group(scheduler, 4, 8), new_group(scheduler, 16, 8)
    dry_step(scheduler)
    for key in (1, 2):
        scheduler.fork(old.seqs[0], key)
    for _ in range(5):
        dry_step(scheduler)
    assert [s.status for s in young.seqs] == [Status.SWAPPED] and scheduler.stats.swaps == 1
    assert cache.allocator.num_free == 2
    late, samples = new_group(scheduler, 4, 1), list(old.seqs)
    while not old.finished:
        batch, is_prefill = dry_step(scheduler)
        assert batch == samples and not is_prefill and late.seqs[0].status is Status.WAITING
    batch, is_prefill = dry_step(scheduler)
    assert is_prefill and batch == late.finished and young.seqs[0].status is Status.RUNNING


def test_requests_swapped_out_together_come_back_in_admission_order():
    """Blocks of 4, a pool of 4: `a` (1 block), `b` (2) and `c` (1) fill it. When `a`'s three
    samples each need a block, `c` and then `b` are swapped out; they come back `b` first, when
    `a` is done."""
    cache = BlockManager(CacheLayout(4, 4), 64, 5)
    scheduler = Scheduler(cache, watermark=0, swap=SwapSpace(cache, 100))
    a, b, c = new_group(scheduler, 4, 2), new_group(scheduler, 7, 4), new_group(scheduler, 3, 4)
    dry_step(scheduler)
    for key in (1, 2):
        scheduler.fork(a.seqs[0], key)
    dry_step(scheduler)
    assert scheduler.stats.swaps == 2 and list(scheduler.swapped) == [b, c] and len(a.finished) == 3
    dry_step(scheduler)
    assert scheduler.running_groups == [b, c]


def test_swapping_in_keeps_the_watermark_while_others_run():
    """A pool of 11 blocks of 4 keeps 1 free while anything runs. When `b` is swapped out, exactly
    its 5 blocks are free: taking them all back would leave none, so it waits for `a`."""
    cache = BlockManager(CacheLayout(4, 11), 64, 2)
    scheduler = Scheduler(cache, watermark=0.1, swap=SwapSpace(cache, 100))
    a, b = new_group(scheduler, 16, 12), new_group(scheduler, 16, 12)
    while not scheduler.stats.swaps:
        dry_step(scheduler)
    assert cache.allocator.num_free == 5 == len(scheduler.swap.tables[b.seqs[0]])
    dry_step(scheduler)
    assert b.seqs[0].status is Status.SWAPPED and scheduler.stats.swaps == 1
    while not scheduler.done:
        dry_step(scheduler)
    assert a.finished and b.finished


def test_a_swap_pool_with_exactly_the_blocks_needed_swaps():
    cache = BlockManager(CacheLayout(4, 4), 64, 2)
    scheduler = Scheduler(cache, watermark=0, swap=SwapSpace(cache, 2))
    new_group(scheduler, 8, 4)
    second = new_group(scheduler, 8, 4)  # the two prompts fill the pool; the first to grow preempts the second
    dry_step(scheduler)
    dry_step(scheduler)
    assert scheduler.stats.swaps == 1 and scheduler.stats.swap_fallbacks == 0
    assert second.seqs[0].status is Status.SWAPPED and scheduler.swap.allocator.num_free == 0


@pytest.mark.parametrize("swap_blocks,fallbacks", [(6, True), (1000, False)])
def test_swap_outputs_equal_unconstrained_run_with_and_without_fallback(tiny_model, swap_blocks, fallbacks):
    requests = random_requests(LENGTHS, TINY.vocab_size, seed=4)
    engine = make_engine(tiny_model, 4, 16, 128, len(requests), preemption="swap",
                         swap_space_bytes=swap_blocks * 4 * SLOT)
    cache = engine.block_manager
    out = [s.output_ids for s in engine.run(requests, progress=False).sequences]
    assert out == generate(make_engine(tiny_model, 4, 200, 128, len(requests)), requests)[0]
    stats = engine.scheduler.stats
    assert stats.swaps > 0 and (stats.swap_fallbacks > 0) == fallbacks
    assert stats.preemptions == stats.swaps + stats.swap_fallbacks
    assert cache.allocator.num_free == 16 and cache.num_cached_tokens == 0
    assert engine.scheduler.swap.allocator.num_free == swap_blocks


def test_dry_run_swaps_bookkeeping_only():
    engine = make_engine(None, 4, 16, 128, 4, preemption="swap", swap_space_bytes=1000 * 4 * SLOT)
    cache = engine.block_manager
    result = engine.run(random_requests(LENGTHS, TINY.vocab_size), progress=False)
    assert [s.num_output_tokens for s in result.sequences] == [n for _, n in LENGTHS]
    assert engine.scheduler.stats.swaps > 0 and engine.runner is None  # no KV tensors, no swap pool
    assert cache.allocator.num_free == 16 and engine.scheduler.swap.allocator.num_free == 1000


def test_cli_swap_reports_swaps(tmp_path, capsys):
    data, path = tmp_path / "short.json", tmp_path / "run.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"Question {i}: why is the sky blue?"}]}
                                for i in range(4)]))
    code = cli.main("paged", ["2", "--data", str(data), "--num-blocks", "4", "--preemption", "swap", "--swap-space-gb",
                              "0.01", "--max-new-tokens", "16", "--no-progress", "--no-answers", "--json", str(path)])
    out = capsys.readouterr().out
    scheduler = json.loads(path.read_text())["scheduler"]
    assert code == 0 and scheduler["swaps"] > 0 and f"({scheduler['swaps']} swapped" in out

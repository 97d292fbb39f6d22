"""The scheduler's admission and preemption rules, one small scene each (dry runs, no model)."""
from __future__ import annotations

import pytest

from conftest import dry_step, new_group
from pagedllama.engine.block_manager import BlockManager
from pagedllama.engine.config import MAX_PREFILL_TOKENS, CacheLayout
from pagedllama.engine.scheduler import Scheduler
from pagedllama.engine.sequence import Status
from pagedllama.engine.swap import SwapSpace


def bookkeeping_cache(num_blocks: int, block_size: int = 4, max_seq_len: int = 512) -> BlockManager:
    return BlockManager(CacheLayout(block_size, num_blocks), max_seq_len, 4)


def test_watermark_holds_back_admissions_but_never_a_request_running_alone():
    """A pool of 100 blocks keeps 1 free while anything runs; a request that needs all 100 is
    admitted only when it would run alone."""
    scheduler = Scheduler(bookkeeping_cache(100), watermark=0.01)
    assert scheduler.watermark_blocks == 1
    first, whole_pool = new_group(scheduler, 4, 2), new_group(scheduler, 400, 1)
    batch, is_prefill = dry_step(scheduler)
    assert is_prefill and batch == first.seqs, "the second would leave less than the watermark free"
    batch, is_prefill = dry_step(scheduler)
    assert not is_prefill and first.finished and whole_pool.seqs[0].status is Status.WAITING
    batch, is_prefill = dry_step(scheduler)
    assert is_prefill and batch == whole_pool.finished and scheduler.block_manager.allocator.num_free == 100


def test_a_prompt_longer_than_the_prefill_budget_is_admitted_alone():
    scheduler = Scheduler(bookkeeping_cache(64), max_prefill_tokens=16, watermark=0)
    long, short = new_group(scheduler, 40, 2), new_group(scheduler, 8, 2)
    assert dry_step(scheduler) == (long.seqs, True)
    assert dry_step(scheduler) == (short.seqs, True)


def test_a_request_preempted_by_recompute_resumes_before_later_arrivals():
    """Blocks of 4, a pool of 6: two 12-token prompts fill it; when both need a block, the later
    one is preempted. `late`, queued before that, would fit at once, but waits its turn."""
    scheduler = Scheduler(bookkeeping_cache(6), watermark=0)
    first, second = new_group(scheduler, 12, 8), new_group(scheduler, 12, 8)
    prefills = [dry_step(scheduler)[0]]
    late = new_group(scheduler, 4, 1)
    while not scheduler.done:
        batch, is_prefill = dry_step(scheduler)
        if is_prefill:
            prefills.append(batch)
    assert scheduler.stats.preemptions == 1 and second.finished[0].num_preemptions == 1
    assert [[s.request_id for s in batch] for batch in prefills] == [["r0", "r1"], ["r1", "r2"]]
    assert late.finished and first.finished


def test_watermark_keeps_a_block_free_for_running_requests():
    """100 blocks of 4, watermark 1: beside a running 1-block request, a 98-block request is
    admitted (1 block stays free) and a 99-block one is not."""
    for blocks, admitted in ((98, True), (99, False)):
        scheduler = Scheduler(bookkeeping_cache(100), watermark=0.01)
        running = new_group(scheduler, 4, 8)
        dry_step(scheduler)
        new_group(scheduler, 4 * blocks, 1)
        batch, is_prefill = dry_step(scheduler)
        assert is_prefill == admitted and (batch == running.seqs) != admitted


def test_a_prefill_step_takes_requests_while_their_tokens_fit_the_budget():
    """Prompts of 40 and 60 fill a budget of 100 exactly and go together; the next waits a step."""
    scheduler = Scheduler(bookkeeping_cache(64), max_prefill_tokens=100, watermark=0)
    a, b, c = new_group(scheduler, 40, 2), new_group(scheduler, 60, 2), new_group(scheduler, 10, 2)
    assert dry_step(scheduler) == (a.seqs + b.seqs, True)
    assert dry_step(scheduler) == (c.seqs, True)


def test_the_default_prefill_budget_is_max_prefill_tokens():
    half = MAX_PREFILL_TOKENS // 2
    cache = BlockManager(CacheLayout(half, 8), 2 * half, 4)
    scheduler = Scheduler(cache, watermark=0)
    a, b, c = new_group(scheduler, half, 2), new_group(scheduler, half, 2), new_group(scheduler, 1, 2)
    assert dry_step(scheduler) == (a.seqs + b.seqs, True)
    assert dry_step(scheduler) == (c.seqs, True)


def test_a_request_larger_than_the_pool_is_a_clear_error():
    scheduler = Scheduler(bookkeeping_cache(4), watermark=0)
    new_group(scheduler, 20, 1)
    with pytest.raises(MemoryError, match="^request r0 needs 20 KV slots but the whole pool holds 16$"):
        scheduler.schedule()


def test_a_request_outgrowing_the_pool_alone_is_a_clear_error():
    """Running alone, it cannot be preempted to make room for itself."""
    scheduler = Scheduler(bookkeeping_cache(2), watermark=0)
    new_group(scheduler, 7, 10)
    with pytest.raises(MemoryError, match="^request r0's 1 sequences outgrow the whole pool of 8 KV slots$"):
        for _ in range(4):
            dry_step(scheduler)


def test_finished_pruned_and_preempted_sequences_say_so():
    scheduler = Scheduler(bookkeeping_cache(16), watermark=0)
    group = new_group(scheduler, 4, 8)
    for _ in range(2):  # preempted twice, recomputed each time
        dry_step(scheduler)
        scheduler.preempt(group)
    dry_step(scheduler)
    seq = group.seqs[0]
    assert seq.num_preemptions == 2 and scheduler.stats.preemptions == 2
    scheduler.finish(seq, "length")
    assert (seq.status, seq.finish_reason, group.finished) == (Status.FINISHED, "length", [seq])
    beams = new_group(scheduler, 4, 8)
    dry_step(scheduler)
    beam = beams.seqs[0]
    scheduler.prune(beam)
    assert (beam.status, beam.finish_reason, beams.finished) == (Status.FINISHED, "pruned", [])
    assert scheduler.done and scheduler.block_manager.allocator.num_free == 16


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_a_request_queued_while_admission_stops_for_memory_is_counted_once(preemption):
    """Blocks of 4, a pool of 6. r0 (4 blocks) runs alone: r2 and r1 wait for memory. Once they
    run, r3 waits for the prefill budget (not memory); then r1 is preempted and cannot come back
    (swapped: it holds up admission itself): r3 is now queued while memory is short. Each of the
    three counts once, r1 too, though it waited twice."""
    cache = bookkeeping_cache(6)
    swap = SwapSpace(cache, 8) if preemption == "swap" else None
    scheduler = Scheduler(cache, max_prefill_tokens=28, watermark=0, swap=swap)
    for tokens, new_tokens in ((16, 1), (12, 8), (8, 8)):  # r0, r2, r1
        new_group(scheduler, tokens, new_tokens)
    dry_step(scheduler)
    new_group(scheduler, 12, 1)  # r3
    while not scheduler.done:
        dry_step(scheduler)
    assert scheduler.stats.waited_for_memory == 3 and scheduler.stats.preemptions > 0
    assert (scheduler.stats.swaps > 0) == (preemption == "swap")


def test_a_preempted_request_readmitted_at_once_did_not_wait_for_memory():
    """Blocks of 4, a pool of 6: r1 is preempted when both requests need a 4th block, and r0 ends
    at that step, so r1 is admitted again with no step stopped for memory."""
    scheduler = Scheduler(bookkeeping_cache(6), watermark=0)
    for new_tokens in (2, 8):
        new_group(scheduler, 12, new_tokens)
    while not scheduler.done:
        dry_step(scheduler)
    assert scheduler.stats.preemptions == 1 and scheduler.stats.waited_for_memory == 0


def test_rows_reserved_at_admission_keep_no_watermark():
    """The naive twin's rows never grow: a pool of 100 of them keeps none free for growth."""
    rows = BlockManager(CacheLayout(64, 100, preallocated=True), 64, 100)
    assert Scheduler(rows, watermark=0.01).watermark_blocks == 0
    assert Scheduler(bookkeeping_cache(100), watermark=0.01).watermark_blocks == 1

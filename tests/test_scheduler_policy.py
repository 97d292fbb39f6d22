"""The scheduler's admission and preemption rules, one small scene each (dry runs, no model)."""
from __future__ import annotations

import torch

from conftest import CPU, TINY, dry_step, new_group
from pagedllama.kv_cache import KVCache
from pagedllama.scheduler import Scheduler
from pagedllama.sequence import Status


def bookkeeping_cache(num_blocks: int, block_size: int = 4, max_seq_len: int = 512) -> KVCache:
    return KVCache(TINY, num_blocks, block_size, max_seq_len, 4, None, CPU, torch.float32, storage=False)


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
    assert is_prefill and batch == whole_pool.finished and scheduler.cache.allocator.num_free == 100


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

"""The model runner's step preparation and the copies it applies: fixed shapes at fixed addresses."""
from __future__ import annotations

import numpy as np
import torch

from conftest import CPU, TINY, make_engine, random_requests
from pagedllama.engine.block_manager import COPY, SWAP_IN, SWAP_OUT, BlockOps
from pagedllama.engine.config import CacheLayout, EngineConfig
from pagedllama.engine.sequence import Sequence
from pagedllama.model.kv_cache import KVCache
from pagedllama.model.model_runner import ModelRunner
from pagedllama.model.parallel import TensorParallel


def test_decode_steps_use_the_same_full_width_buffers(tiny_model):
    """Every decode step's block table is padded to the most blocks a sequence can hold and sits at
    the same address, however long the contexts are: what capturing decode in CUDA graphs needs."""
    requests = random_requests([(3, 30), (20, 30)], TINY.vocab_size)
    engine = make_engine(tiny_model, 4, 40, 64, 2)
    engine.add(requests)
    engine.step()  # prefill
    runner, seen = engine.runner, []
    prepare = runner.prepare

    def record(seqs, is_prefill, *args, **kwargs):
        tokens, positions, meta = prepare(seqs, is_prefill, *args, **kwargs)
        seen.append((meta.block_tables.shape, meta.block_tables.data_ptr(), tokens.data_ptr(),
                     meta.max_context_len, meta.block_tables.tolist()))
        return tokens, positions, meta

    runner.prepare = record
    for _ in range(20):
        engine.step()
    assert {shape for shape, *_ in seen} == {(2, 64 // 4)}
    assert len({(tables, tokens) for _, tables, tokens, *_ in seen}) == 1
    assert len({context for *_, context, _ in seen}) == 20  # the contexts grew, the shapes did not
    last = seen[-1][-1]
    for row, seq in zip(last, engine.scheduler.running):
        assert row[:len(seq.block_table)] == seq.block_table and not any(row[len(seq.block_table):])


def test_copies_and_swaps_are_applied_in_the_order_decided():
    """A block swapped out, then given to a copy decided after it: the CPU pool gets the block's old
    contents, the block its copy's."""
    layout = CacheLayout(4, 3)
    kv = KVCache(TINY, layout, None, CPU, torch.float32, swap_blocks=2)
    for b in range(3):
        kv.kv[:, :, b] = b + 1
    ops = BlockOps()
    ops.add(SWAP_OUT, [(0, 1)])  # block 0 -> CPU block 1; block 0 is free again
    ops.add(COPY, [(2, 0)])  # copy on write into the freed block 0
    ops.add(SWAP_IN, [(1, 1)])  # and back into block 1
    kv.apply(ops)
    assert [ops.runs[i][0] for i in range(3)] == [SWAP_OUT, COPY, SWAP_IN]
    assert (kv.swap_kv[:, :, 1] == 1).all()
    assert (kv.kv[:, :, 0] == 3).all() and (kv.kv[:, :, 1] == 1).all() and (kv.kv[:, :, 2] == 3).all()


def test_runs_of_one_kind_merge():
    ops = BlockOps()
    ops.add(COPY, [(0, 1)])
    ops.add(COPY, [(2, 3)])
    ops.add(SWAP_OUT, [(1, 0)])
    assert ops.runs == [(COPY, [(0, 1), (2, 3)]), (SWAP_OUT, [(1, 0)])] and ops
    assert not BlockOps()


def test_a_prefill_longer_than_the_buffers_grows_them_with_headroom():
    """A first prefill is never split, so it may exceed the prefill budget the buffers were sized for:
    they grow to its tokens and a quarter more (so that a slightly longer prompt next does not grow
    them again); a step that fills them exactly keeps them. Either way its inputs are the same."""
    config = EngineConfig("paged", TINY, 64, torch.float32, CPU, 4, max_prefill_tokens=16)
    runner = ModelRunner(config, None, CacheLayout(4, 40), 2, None)
    tables = np.arange(2 * 16, dtype=np.int32).reshape(2, 16)  # row r holds blocks 16r, 16r + 1, ...
    sized = runner.prefill_buffers
    for n, row in ((16, 0), (21, 1)):
        tokens, positions, meta = runner.prepare([Sequence(row, "r", list(range(100, 100 + n)), n, 1, row=row)],
                                                 True, tables)
        assert tokens.tolist() == list(range(100, 100 + n)) and positions.tolist() == list(range(n))
        assert meta.slot_mapping.tolist() == [64 * row + p for p in range(n)]  # block 16r + p // 4, slot p % 4
        assert meta.block_tables.tolist() == [tables[row].tolist()]
        if n == 16:
            assert runner.prefill_buffers is sized
    grown = runner.prefill_buffers
    assert grown.max_tokens == 21 + 21 // 4 and grown.max_seqs == sized.max_seqs == 2
    assert grown.host_block_tables.shape == sized.host_block_tables.shape == (2, 16)


def test_a_tensor_parallel_rank_stores_its_share_of_the_kv_heads():
    config = EngineConfig("paged", TINY, 64, torch.float32, CPU, 4, tensor_parallel=TensorParallel(1, 2))
    runner = ModelRunner(config, None, CacheLayout(4, 8), 2, None)
    assert runner.cache.kv.shape == (2, TINY.n_layers, 8, 4, TINY.n_kv_heads // 2, TINY.head_dim)

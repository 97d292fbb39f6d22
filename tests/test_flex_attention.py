"""The FlexAttention backend: reads K/V blocks in place, and gives what the others give.

Against the dense float64 reference at the kernel level (test_attention.run_steps), and both twins
end to end against the float64 formulas (llama_reference.py) and the torch backend's tokens.
"""
from __future__ import annotations

import pytest
import torch

from conftest import REFERENCE_SHAPES, generate, random_requests, run_against_reference
from test_attention import run_steps
from test_engine_reference import MAX_SEQ_LEN, engine_for, requests_for

from pagedllama.errors import UsageError
from pagedllama.model import attention
from pagedllama.model import backends
from pagedllama.model.attention import gather_kv as real_gather
from pagedllama.model.backends import select_backend
from pagedllama.model.flex_attention import (CHUNK_QUERY_TILE, FlexAttention, decode_query_tile, expand_block_tables,
                                             kernel_block_size, kernel_options, pool_problem)

CPU = torch.device("cpu")


def in_place() -> FlexAttention:
    """The backend with every in-place path on: decode at any batch, and prompt chunks after cached
    context (by default those take the torch path, which measured faster on CPU)."""
    return FlexAttention(min_batch=1, chunks_in_place=True)


@pytest.mark.parametrize("block_size, dtype", [(16, torch.float32), (48, torch.bfloat16), (512, torch.float32)])
def test_flex_backend(block_size, dtype):
    """Prefill, a decode step and a chunk after cached context, through shuffled block tables: blocks
    of one kernel tile (16), of three (48) and of eight (512, a naive-twin row)."""
    run_steps(in_place(), block_size, dtype)


def test_flex_backend_with_a_scale_and_equal_contexts():
    run_steps(in_place(), 16, torch.float32, (64, 64, 64), scale=0.3)
    run_steps(in_place(), 16, torch.float32, (16, 32, 5), steps=("prefill", "chunk", "decode", "chunk"))


def test_flex_decode_reads_the_cache_in_place(monkeypatch):
    """Decode and chunks after cached context gather nothing: the kernel reads the blocks."""
    def no_gather(*args, **kwargs):
        raise AssertionError("gathered K/V")

    monkeypatch.setattr(attention, "gather_kv", no_gather)
    run_steps(in_place(), 16, torch.float32)


def test_small_decode_batches_take_the_torch_path(monkeypatch):
    """Under `min_batch` decode gathers (the torch backend's path); at it, it does not."""
    gathered = []
    monkeypatch.setattr(attention, "gather_kv", lambda *a, **k: gathered.append(1) or real_gather(*a, **k))
    run_steps(FlexAttention(min_batch=4), 16, torch.float32, (5, 30, 17), steps=("prefill", "decode"))
    assert gathered
    gathered.clear()
    run_steps(FlexAttention(min_batch=3), 16, torch.float32, (5, 30, 17), steps=("prefill", "decode"))
    assert not gathered


def test_prompt_chunks_take_the_torch_path_by_default(monkeypatch):
    """`chunks_in_place` off (the default): a chunk after cached context is gathered, decode is not."""
    gathered = []
    monkeypatch.setattr(attention, "gather_kv", lambda *a, **k: gathered.append(1) or real_gather(*a, **k))
    run_steps(FlexAttention(min_batch=1), 16, torch.float32, steps=("prefill", "decode"))
    assert not gathered
    run_steps(FlexAttention(min_batch=1), 16, torch.float32, steps=("prefill", "chunk"))
    assert gathered


def test_tiles_follow_the_block_table():
    tables = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32)
    assert expand_block_tables(tables, 1) is tables
    assert expand_block_tables(tables, 4).tolist() == [[12, 13, 14, 15, 0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]
    assert [kernel_block_size(b) for b in (16, 48, 96, 512, 2048)] == [16, 16, 32, 64, 64]


@pytest.mark.parametrize("group", [1, 3, 4, 8, 32])
@pytest.mark.parametrize("block_size", [16, 48, 256, 4096])
def test_cuda_kernel_tiles_divide_the_block_masks(group, block_size):
    """Triton's flex template refuses a block mask whose tiles are not whole multiples of its kernel
    tiles (torch/_inductor/kernel/flex/flex_attention.py), and computes at least 16 query rows at
    once; the CPU template takes the block mask's own tiles (no GPU here: the rule itself is checked)."""
    cuda = torch.device("cuda")
    kv_tile = kernel_block_size(block_size)
    decode_tile = decode_query_tile(group, cuda)
    assert decode_tile >= group and decode_tile & (decode_tile - 1) == 0
    for query_tile in (decode_tile, CHUNK_QUERY_TILE):
        options = kernel_options(cuda, query_tile, kv_tile)
        assert query_tile % options["BLOCK_M"] == 0 and kv_tile % options["BLOCK_N"] == 0
        assert min(options["BLOCK_M"], options["BLOCK_N"]) >= 16 and options["FORCE_USE_FLEX_ATTENTION"]
    assert decode_query_tile(group, CPU) == group and kernel_options(CPU, group, kv_tile) is None


def test_cuda_pool_within_the_kernels_int32_offsets():
    """On CUDA the template's K/V offsets are int32: a layer of up to 2^31 elements is addressed (bench/gpu.py's
    kernel pool, 256 x 8192 slots at Llama 3 8B's 8 x 128 KV heads, is exactly that), one block more is
    refused with the most blocks that fit; the CPU kernel is not limited so."""
    cuda, at_8b = torch.device("cuda"), (16, 8, 128)
    assert pool_problem((256 * 8192 // 16, *at_8b), cuda) is None
    message = pool_problem((256 * 8192 // 16 + 1, *at_8b), cuda)
    assert "reach 131072 blocks of 16 slots" in message and "has 131073" in message and "--attention triton" in message
    assert pool_problem((256 * 8192 // 16 + 1, *at_8b), CPU) is None


@pytest.mark.parametrize("block_size", [8, 100])
def test_flex_refuses_blocks_it_cannot_tile(block_size):
    with pytest.raises(UsageError, match="multiple of 16.*--attention torch"):
        run_steps(in_place(), block_size, torch.float32)


def test_flex_is_selectable_by_name():
    assert select_backend("flex", CPU, torch.float32, 16, 512).name == "flex"


@pytest.mark.parametrize("name, twin", [(list(REFERENCE_SHAPES)[0], "naive"), (list(REFERENCE_SHAPES)[1], "paged")])
def test_both_twins_through_flex_equal_the_formulas(name, twin):
    """As test_engine_reference's twins, through the flex backend: the naive twin's rows are one
    block each (two rows for three requests: one waits), the paged twin's blocks are shuffled."""
    if twin == "naive":
        engine, sd = engine_for(name, MAX_SEQ_LEN, 2, backend=in_place())
    else:
        engine, sd = engine_for(name, 16, 24, backend=in_place())
        order = torch.randperm(24, generator=torch.Generator().manual_seed(3)).tolist()
        engine.block_manager.allocator._free.clear()
        engine.block_manager.allocator._free.extend(order)
    run_against_reference(engine, requests_for(name), sd)


def test_flex_tokens_equal_the_torch_backends_with_preemption_and_prefix_caching():
    """A tight pool (requests are preempted and recomputed) and prefix caching (a shared prompt is
    prefilled after its cached blocks: the in-place chunk path), greedy tokens as the torch backend's."""
    name = list(REFERENCE_SHAPES)[0]
    shared = random_requests([(32, 1)], REFERENCE_SHAPES[name].vocab_size, seed=5)[0].prompt_ids
    requests = [r.__class__(r.request_id, shared + r.prompt_ids, r.max_new_tokens)
                for r in random_requests([(20, 30), (5, 40), (33, 20)], REFERENCE_SHAPES[name].vocab_size, seed=6)]
    tokens = {}
    for backend in (in_place(), attention.TorchAttention()):
        engine, _ = engine_for(name, 16, 8, backend=backend, prefix_caching=True)
        tokens[backend.name], _ = generate(engine, requests)
        assert engine.scheduler.stats.preemptions > 0
        assert engine.block_manager.prefix_cache.summary()["cached_tokens"] > 0
    assert tokens["flex"] == tokens["torch"]


def test_auto_takes_flex_on_cpu_for_models_it_pays_for(monkeypatch):
    """auto on CPU: flex from FLEX_AUTO_MIN_PARAMS parameters where it compiles, for both twins' blocks."""
    big = backends.FLEX_AUTO_MIN_PARAMS
    assert select_backend("auto", CPU, torch.float32, 16, 4096, big).name == "flex"
    assert select_backend("auto", CPU, torch.float32, 4096, 16, big).name == "flex"
    assert select_backend("auto", CPU, torch.float32, 16, 4096, big - 1).name == "torch"
    assert select_backend("auto", CPU, torch.float32, 16, 1000, big).name == "torch"  # naive rows do not tile
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert select_backend("auto", CPU, torch.float32, 16, 4096, big).name == "torch"


def test_flex_says_what_it_needs(monkeypatch):
    with pytest.raises(UsageError, match="multiple of 16"):
        select_backend("flex", CPU, torch.float32, 24, 512)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UsageError, match="C\\+\\+ compiler.*--attention torch"):
        select_backend("flex", CPU, torch.float32, 16, 512)

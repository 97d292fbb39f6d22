"""Both twins, through each attention backend that runs here, against the float64 reference.

test_engine.py compares the engine with `full_forward`, which shares RoPE, RMSNorm
and the FFN with the cached path: it shows that cached equals uncached, not that either is Llama.
Here every token the engine picks is checked against llama_reference.py, which shares no code with
the package (`run_against_reference`), at every shape of `REFERENCE_SHAPES` (RoPE scaling, tied
output, GQA 1, 4 and 8, head dims 64 and 128). The Triton kernel's run is in
test_triton_attention.py (it needs Triton's interpreter set up before import).
"""
from __future__ import annotations

import sys

import pytest
import torch

import flash_attn_standin
from conftest import CPU, REFERENCE_SHAPES, lively_state_dict, make_engine, random_requests, run_against_reference
from pagedllama.engine.engine import Engine
from pagedllama.io.checkpoint import build_model
from pagedllama.model.attention import FlashAttention

# Prompts up to 70 tokens and answers up to 20: positions where Llama 3.1's RoPE scaling matters.
LENGTHS = [(70, 12), (5, 20), (33, 8)]
MAX_SEQ_LEN = 96


def engine_for(name: str, block_size: int, num_blocks: int, dtype: torch.dtype = torch.float32, backend=None,
               **engine_args) -> tuple[Engine, dict[str, torch.Tensor]]:
    args = REFERENCE_SHAPES[name]
    sd = {k: v.to(dtype) for k, v in lively_state_dict(args, seed=21).items()}
    if args.tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model = build_model(args, sd, CPU, dtype, max_positions=MAX_SEQ_LEN)
    return make_engine(model, block_size, num_blocks, MAX_SEQ_LEN, len(LENGTHS), backend, dtype, **engine_args), sd


def requests_for(name: str):
    return random_requests(LENGTHS, REFERENCE_SHAPES[name].vocab_size, seed=22)


@pytest.mark.parametrize("name", REFERENCE_SHAPES)
def test_naive_twin_equals_the_formulas(name):
    """One preallocated row of max_seq_len slots per request; two rows for three requests, so the
    third waits for the first to finish."""
    engine, sd = engine_for(name, MAX_SEQ_LEN, 2)
    run_against_reference(engine, requests_for(name), sd)
    assert engine.scheduler.stats.peak_running == 2


@pytest.mark.parametrize("name", REFERENCE_SHAPES)
def test_paged_twin_equals_the_formulas(name):
    """Blocks of 16 handed out in a shuffled order, so block tables point all over the pool."""
    engine, sd = engine_for(name, 16, 24)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(3)).tolist()
    engine.block_manager.allocator._free.clear()
    engine.block_manager.allocator._free.extend(order)
    run_against_reference(engine, requests_for(name), sd)
    assert engine.scheduler.stats.fits_in_memory and engine.block_manager.allocator.num_free == 24


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_preempting_run_equals_the_formulas(preemption):
    """A pool of 12 blocks of 8 (the longest request needs 11): running requests are preempted, then
    recomputed from their tokens or swapped back in, and go on as the formulas say."""
    engine, sd = engine_for("3.1-gqa8-hd64", 8, 12, preemption=preemption, swap_space_bytes=1 << 24)
    run_against_reference(engine, requests_for("3.1-gqa8-hd64"), sd)
    stats = engine.scheduler.stats
    assert stats.preemptions > 0 and (stats.swaps > 0) == (preemption == "swap")
    assert engine.block_manager.allocator.num_free == 12


# bfloat16 against float64 on the same (bf16-rounded) weights: every activation is rounded to 8
# significant bits on the way; at these shapes the logits came within 2-4% of their largest
# magnitude (through either the torch backend or the stand-in).
BF16_TOLERANCE = 0.05


@pytest.mark.parametrize("num_blocks", [3, 1], ids=["ample", "tight"])
def test_flash_attn_call_sites_equal_the_formulas_in_bfloat16(monkeypatch, num_blocks):
    """The engine through FlashAttention's paged call sites (the stand-in, which takes bf16 and
    fp16 only, as the kernel does: decode appends K/V in place through the block table), pages of
    256 slots; with one page requests take turns."""
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_standin)
    flash_attn_standin.calls.clear()
    engine, sd = engine_for("3.2-gqa4-hd128-tied", 256, num_blocks, torch.bfloat16, FlashAttention())
    run_against_reference(engine, requests_for("3.2-gqa4-hd128-tied"), sd, tolerance=BF16_TOLERANCE)
    assert engine.scheduler.stats.fits_in_memory == (num_blocks == 3)
    assert {"flash_attn_varlen_func", "flash_attn_with_kvcache"} <= set(flash_attn_standin.calls)

"""The GPU measurements: Llama-3-8B-shaped random weights in bfloat16 on one CUDA device.

1. copy: the two ceilings. A device-to-device copy of 2 GiB (bytes read plus bytes written, per
   second) and an 8192^3 bf16 matrix product (FLOP per second), both on random data.
2. correct: greedy tokens on CUDA against the full-recompute reference (tests/full_forward.py, no cache).
   A small model in float32: both twins, each backend (torch, triton; triton also from CUDA
   graphs), an ample pool and tight pools that preempt (recompute, swap); every token must equal
   the reference. Llama-3-8B-shaped weights in bfloat16: the same runs, compared with each other
   and with the float32 reference on the same weights (bf16 rounding may tip a near-tie: the
   agreement is reported, not asserted). A run that fails is recorded with its error, and the
   others go on.
3. kernel: decode attention, the project's Triton paged kernel (16-slot blocks scattered through
   one pool) against PyTorch's SDPA on the same K/V laid out contiguously, at batch 1 to 256 and
   context 512 to 8192; each kernel's K/V bytes per second set against the copy bandwidth.
4. decode: each twin's decode step (the CLI's `--attention auto`: flash-attn if installed, else
   Triton) at batch 1 to 256, eager and replayed from CUDA graphs, against its floor: the larger
   of (weights + K/V read) / copy bandwidth and (2 x weights x batch) FLOP / matmul rate. The
   embedding table is not counted (a step reads one row of it per sequence). Eager and graph
   runs' tokens are compared.
5. budget: the same KV budget, the product's headline case: the budget Llama 3 8B has on a
   24 GB GPU (6.19 preallocations of 8192 tokens), ShareGPT prompts with their reference answer
   lengths capped at 128; the naive twin in consecutive waves of its largest batch (as running
   llama3-naive.py repeatedly), the paged twin at its largest batch; output tokens per second,
   eager and with CUDA graphs (captured before the clock starts, for both twins).
6. flex: the flex backend (FlexAttention compiled with Triton, reading the blocks in place; first
   run on a GPU here, and each new cache size compiles, so it comes after the parts above): the
   correct part's runs and the kernel part's cases through it.
7. flash: FlashAttention's paged decode, if a flash-attn package imports here (flash-attn 2's
   `flash_attn_with_kvcache`, or FlashAttention-4's `flash_attn.cute` with `page_table`), against
   the Triton kernel on the kernel part's cases; otherwise the import error is recorded.

    python bench/gpu.py            # CUDA with triton; a few minutes on an H200
    python bench/gpu.py --smoke    # any machine: a tiny shape through the same code, Triton's
                                   # CPU interpreter for the kernel (the tests run this)
    python bench/gpu.py --parts decode budget   # only these; the rest kept from the results file

Results: bench/results/gpu/gpu.json (written after each part, so a run cut short keeps what it
measured, and `--parts` finishes it); `python bench/tables.py --fill BENCHMARKS.md` renders them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]  # tests/: full_forward, row_metadata

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pagedllama.app.capacity import find_max_batch  # noqa: E402
from pagedllama.engine.block_manager import cdiv  # noqa: E402
from pagedllama.engine.budget import cache_layout, reference_preallocations  # noqa: E402
from pagedllama.engine.config import CacheLayout, EngineConfig  # noqa: E402
from pagedllama.engine.engine import Engine, build_engine  # noqa: E402
from pagedllama.engine.sequence import Request  # noqa: E402
from pagedllama.io.checkpoint import build_model, random_state_dict  # noqa: E402
from pagedllama.model.backends import select_backend  # noqa: E402
from pagedllama.model.config import NAMED_SHAPES, ModelArgs  # noqa: E402
from pagedllama.model.flex_attention import FlexAttention, flex_problem  # noqa: E402
from full_forward import full_forward  # noqa: E402
from row_metadata import decode_metadata  # noqa: E402
from overhead import BLOCK_SIZE, cache_for  # noqa: E402  (the bench's shared pieces: one cache-sizing rule)

GIB = 1 << 30
PARTS = ("copy", "correct", "kernel", "decode", "budget", "flex", "flash")  # the numbered parts of the docstring
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4352, hidden_dim=160)  # demo tokenizer's vocab
SMALL = ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=4352, hidden_dim=768)  # head dim 32
FULL = {"args": NAMED_SHAPES["llama3-8b"], "small_args": SMALL, "copy_bytes": 2 * GIB, "matmul_n": 8192,
        "correct_lengths": ((1, 24), (9, 24), (40, 24), (130, 24), (301, 24), (64, 24)),
        "kernel_batches": (1, 16, 64, 256), "kernel_contexts": (512, 2048, 8192),
        "step_batches": (1, 16, 64, 256), "prompt": 512, "steps": 16, "repeats": 20,
        "budget_max_seq_len": 8192, "budget_requests": 128, "budget_cap": 128}
SMOKE_PLAN = {"args": TINY, "small_args": TINY, "copy_bytes": 1 << 20, "matmul_n": 64,
              "correct_lengths": ((1, 4), (15, 3), (40, 5)),
              "kernel_batches": (1, 3), "kernel_contexts": (40,),
              "step_batches": (1, 3), "prompt": 20, "steps": 2, "repeats": 2,
              "budget_max_seq_len": 4096, "budget_requests": 10, "budget_cap": 4}


def timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """Median seconds of a call: CUDA events on a GPU (after a warm-up call), the host clock elsewhere."""
    def median_seconds(fn: Callable[[], object], repeats: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return median_seconds


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy, counting what is read and what is written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(device)(lambda: dst.copy_(src), repeats)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP per second of an n x n x n matrix product on random data."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timer(device)(lambda: a @ b, repeats)


def random_requests(lengths: tuple[tuple[int, int], ...], vocab: int, seed: int) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    return [Request(f"r{i}", torch.randint(1, vocab, (p,), generator=g).tolist(), n) for i, (p, n) in enumerate(lengths)]


def greedy_reference(model, reqs: list[Request], device: torch.device) -> list[list[int]]:
    """Greedy tokens by full recomputation with no cache (`full_forward`): the ground truth."""
    out = []
    for r in reqs:
        ids = list(r.prompt_ids)
        for _ in range(r.max_new_tokens):
            ids.append(int(full_forward(model, torch.tensor([ids], device=device))[0, -1].argmax()))
        out.append(ids[len(r.prompt_ids):])
    return out


def correctness_runs(attentions: tuple[str, ...]) -> list[tuple[str, str, str, str, bool]]:
    """(twin, attention, pool, preemption, CUDA graphs) of every run through these backends."""
    runs = []
    for attention in attentions:
        for twin, pool, preemption in (("naive", "ample", "recompute"), ("paged", "ample", "recompute"),
                                       ("paged", "tight", "recompute"), ("paged", "tight", "swap")):
            runs.append((twin, attention, pool, preemption, False))
            if attention == "triton" and preemption == "recompute":
                runs.append((twin, attention, pool, preemption, True))
    return runs


def run_twin(model, args: ModelArgs, reqs: list[Request], twin: str, attention: str, pool: str, preemption: str,
             graphs: bool, device: torch.device, dtype: torch.dtype, max_seq_len: int):
    """One greedy run of `reqs`: naive rows, or a paged pool that holds them all (ample) or just their
    prompts (tight: every request is admitted, and the first to grow preempts another)."""
    if twin == "naive":
        num_blocks, block_size = len(reqs), max_seq_len
    else:
        need = [cdiv(len(r.prompt_ids) + r.max_new_tokens, BLOCK_SIZE) for r in reqs]
        prompts = sum(cdiv(len(r.prompt_ids), BLOCK_SIZE) for r in reqs)
        num_blocks = sum(need) + 1 if pool == "ample" else max(max(need), prompts)
        block_size = BLOCK_SIZE
    backend = select_backend(attention, device, dtype, block_size, BLOCK_SIZE if twin == "naive" else max_seq_len)
    if backend.name == "flex":  # every decode batch through the kernel, also those the CLI sends the torch way
        backend = FlexAttention(min_batch=1)
    config = EngineConfig(twin, args, max_seq_len, dtype, device, BLOCK_SIZE, ignore_eos=True, preemption=preemption,
                          swap_space_bytes=num_blocks * block_size * args.kv_bytes_per_token(dtype.itemsize),
                          cuda_graphs=graphs)
    engine = Engine(config, CacheLayout(block_size, num_blocks), len(reqs), model, backend)
    result = engine.run(reqs, progress=False)
    return [s.output_ids for s in result.sequences], engine.scheduler.stats


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def correctness(label: str, model, reference: list[list[int]], args: ModelArgs, reqs: list[Request],
                device: torch.device, dtype: torch.dtype, max_seq_len: int, attentions: tuple[str, ...]) -> list[dict]:
    """Every run of `correctness_runs` against the reference tokens and against the first run."""
    rows, first = [], None
    for twin, attention, pool, preemption, graphs in correctness_runs(attentions):
        run = {"model": label, "twin": twin, "attention": attention, "pool": pool, "preemption": preemption,
               "cuda_graphs": graphs, "requests": len(reqs)}
        try:
            out, stats = run_twin(model, args, reqs, twin, attention, pool, preemption, graphs, device, dtype,
                                  max_seq_len)
        except Exception as e:  # one backend failing on this GPU is a result; the other runs go on
            rows.append({**run, "error": f"{type(e).__name__}: {e}"[:500]})
            log(f"correct {label} {twin} {attention}{' graphs' if graphs else ''} {pool}/{preemption}: "
                f"FAILED {rows[-1]['error']}")
            continue
        first = first or out
        rows.append({**run, "preemptions": stats.preemptions, "tokens": sum(map(len, out)),
                     "identical_to_reference": sum(o == r for o, r in zip(out, reference)),
                     "tokens_before_divergence": sum(map(common_prefix, out, reference)),
                     "identical_to_first_run": sum(o == f for o, f in zip(out, first))})
        log(f"correct {label} {twin} {attention}{' graphs' if graphs else ''} {pool}/{preemption}: "
            f"{rows[-1]['identical_to_reference']}/{len(reqs)} requests as the reference, "
            f"{stats.preemptions} preemptions")
    return rows


def kernel_pool(args: ModelArgs, plan: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """One random K and one V pool of 16-slot blocks for every decode case, sized for the largest, as
    an engine keeps one pool (and flex compiles its kernel once for that pool's size)."""
    blocks = max(plan["kernel_batches"]) * cdiv(max(plan["kernel_contexts"]), BLOCK_SIZE)
    g = torch.Generator(device).manual_seed(0)
    return tuple(torch.randn(blocks, BLOCK_SIZE, args.n_kv_heads, args.head_dim, generator=g, device=device,
                             dtype=dtype) for _ in range(2))


def decode_case(args: ModelArgs, pool: tuple[torch.Tensor, ...], batch: int, context: int):
    """Random decode inputs: one query per sequence over `context` keys in blocks scattered through
    the pool. Returns (q, block_table, context_lens, query_start_loc)."""
    device, dtype = pool[0].device, pool[0].dtype
    g = torch.Generator(device).manual_seed(batch * 100003 + context)
    blocks_per_seq = cdiv(context, BLOCK_SIZE)
    block_table = torch.randperm(len(pool[0]), generator=g, device=device)[:batch * blocks_per_seq]
    block_table = block_table.view(batch, blocks_per_seq).int()
    q = torch.randn(batch, args.n_heads, args.head_dim, generator=g, device=device, dtype=dtype)
    context_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
    return q, block_table, context_lens, query_start_loc


def kernel_case(args: ModelArgs, pool: tuple[torch.Tensor, ...], batch: int, context: int, repeats: int) -> dict:
    """Decode attention over `context` keys per sequence: Triton through the block table vs SDPA on a
    contiguous (batch, kv_heads, context, head_dim) copy of the same K/V."""
    from pagedllama.model.triton_attention import paged_attention

    k_cache, v_cache = pool
    q, block_table, context_lens, query_start_loc = decode_case(args, pool, batch, context)
    scale = args.head_dim ** -0.5
    sdpa = contiguous_sdpa(q, pool, block_table, context)

    def paged():
        return paged_attention(q, k_cache, v_cache, block_table, context_lens, query_start_loc, 1, context, scale)

    diff = (paged().float() - sdpa().float()).abs().max().item()
    clock = timer(q.device)
    t_paged, t_sdpa = clock(paged, repeats), clock(sdpa, repeats)
    kv_bytes = 2 * batch * context * args.n_kv_heads * args.head_dim * k_cache.element_size()
    return {"batch": batch, "context": context, "kv_bytes": kv_bytes, "paged_us": 1e6 * t_paged,
            "sdpa_us": 1e6 * t_sdpa, "paged_bytes_per_s": kv_bytes / t_paged, "sdpa_bytes_per_s": kv_bytes / t_sdpa,
            "max_abs_diff": diff}


def contiguous_sdpa(q: torch.Tensor, pool: tuple[torch.Tensor, ...], block_table: torch.Tensor,
                    context: int) -> Callable[[], torch.Tensor]:
    """SDPA over a contiguous (batch, kv_heads, context, head_dim) copy of the sequences' K/V."""
    k_dense, v_dense = (c[block_table.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous() for c in pool)
    scale = q.shape[-1] ** -0.5
    return lambda: F.scaled_dot_product_attention(q[:, :, None], k_dense, v_dense, scale=scale,
                                                  enable_gqa=True)[:, :, 0]


def flex_kernel_case(args: ModelArgs, pool: tuple[torch.Tensor, ...], batch: int, context: int, flex: FlexAttention,
                     repeats: int) -> dict:
    """The kernel part's case through the flex backend, called as a layer calls it (the block mask is
    built by the step's first call, then reused); checked against SDPA on the contiguous copy."""
    hkv, d = args.n_kv_heads, args.head_dim
    q, block_table, _, _ = decode_case(args, pool, batch, context)
    meta = decode_metadata(block_table, [context] * batch, BLOCK_SIZE)
    k_new, v_new = (c.view(-1, hkv, d)[meta.slot_mapping] for c in pool)  # stores each last key as it is

    def flex_paged():
        return flex.forward(q, k_new, v_new, *pool, meta, d ** -0.5)

    row = {"batch": batch, "context": context}
    try:
        row["max_abs_diff"] = (flex_paged().float() - contiguous_sdpa(q, pool, block_table, context)().float()
                               ).abs().max().item()
        row["flex_us"] = 1e6 * timer(q.device)(flex_paged, repeats)
    except Exception as e:  # a failure to compile or run here is the result
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    return row


def flash_cases(args: ModelArgs, pool: tuple[torch.Tensor, ...], batches, contexts, repeats: int) -> dict:
    """FlashAttention-4's paged forward (`flash_attn.cute`, `page_table` + `seqused_k`) against the
    Triton kernel on the kernel part's decode cases, if it imports here; else why not."""
    try:
        from flash_attn.cute import __version__ as fa_version, flash_attn_varlen_func
    except Exception as e:  # not installed, or its compiler libraries missing: the reason is the result
        return {"available": False, "error": f"{type(e).__name__}: {e}"[:500]}
    from pagedllama.model.triton_attention import paged_attention

    rows = []
    for batch in batches:
        for context in contexts:
            q, table, lens, starts = decode_case(args, pool, batch, context)
            k_cache, v_cache = pool
            scale = args.head_dim ** -0.5

            def flash():
                out = flash_attn_varlen_func(q[:, None], k_cache, v_cache, seqused_k=lens, page_table=table,
                                             softmax_scale=scale, causal=True)
                return (out[0] if isinstance(out, tuple) else out)[:, 0]

            def triton_paged():
                return paged_attention(q, k_cache, v_cache, table, lens, starts, 1, context, scale)

            try:
                diff = (flash().float() - triton_paged().float()).abs().max().item()
                clock = timer(q.device)
                t_flash, t_triton = clock(flash, repeats), clock(triton_paged, repeats)
            except Exception as e:
                return {"available": False, "version": fa_version, "error": f"{type(e).__name__}: {e}"[:500],
                        "cases": rows}
            rows.append({"batch": batch, "context": context, "flash_us": 1e6 * t_flash, "triton_us": 1e6 * t_triton,
                         "max_abs_diff": diff})
            log(f"flash-attn 4 B={batch} ctx={context}: {1e6 * t_flash:.0f} us, triton {1e6 * t_triton:.0f} us, "
                f"max diff {diff:.1e}")
    return {"available": True, "version": fa_version, "cases": rows}


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter but the embedding table."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("tok_embeddings"))


def decode_steps(model, args: ModelArgs, twin: str, batch: int, prompt: int, steps: int, device: torch.device,
                 dtype: torch.dtype, attention: str, graphs: bool) -> dict:
    """Median decode-step time of one twin at `batch`, every sequence `prompt` tokens into its context,
    and the tokens it generated."""
    g = torch.Generator().manual_seed(batch)
    reqs = [Request(f"r{i}", torch.randint(1, args.vocab_size, (prompt,), generator=g).tolist(), steps + 1)
            for i in range(batch)]
    max_seq_len = prompt + steps + 1
    blocks = (max_seq_len, BLOCK_SIZE) if twin == "naive" else (BLOCK_SIZE, max_seq_len)
    backend = select_backend(attention, device, dtype, *blocks)  # `auto`: one kernel for both twins
    cache = cache_for(args, twin, reqs, True, dtype, max_seq_len, backend, device, max_prefill_tokens=32768,
                      cuda_graphs=graphs)  # room for the whole batch
    t0 = time.perf_counter()
    engine = cache.engine(model, cache.sized_for)
    capture_s = time.perf_counter() - t0
    groups = engine.add(reqs)
    while engine.scheduler.waiting:  # prefill
        engine.step()
    assert len(engine.scheduler.running) == batch, "the batch did not fit at once"
    engine.step()  # the first decode step: compiles the decode kernels
    times = []
    for _ in range(steps - 1):
        t0 = time.perf_counter()
        engine.step()  # ends by copying the sampled tokens to the host: the GPU work is done
        times.append(time.perf_counter() - t0)
    context = prompt + 1 + steps // 2
    return {"twin": twin, "batch": batch, "backend": backend.name, "cuda_graphs": graphs,
            "capture_s": capture_s if graphs else None, "step_ms": 1e3 * statistics.median(times),
            "step_ms_range": [1e3 * min(times), 1e3 * max(times)], "mean_context": context,
            "kv_bytes_read": batch * context * args.kv_bytes_per_token(dtype.itemsize),
            "tokens": [s.output_ids for grp in groups for s in grp.outputs()]}


def generate(engine: Engine, reqs: list[Request], device: torch.device) -> tuple[list[list[int]], float]:
    """Every request to its length (greedy, EOS ignored): the output tokens and the seconds it took
    (CUDA graphs are captured before the clock starts, when the engine is built)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = engine.run(reqs, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [s.output_ids for s in result.sequences], time.perf_counter() - t0


def same_budget(model, args: ModelArgs, max_seq_len: int, num_requests: int, cap: int, device: torch.device,
                dtype: torch.dtype, attention: str, graphs: bool) -> dict:
    """Output tokens per second of each twin at its largest batch within the same KV budget."""
    from common import sharegpt_requests  # the shipped ShareGPT sample, tokenized as the demo does

    bpt = args.kv_bytes_per_token(dtype.itemsize)
    budget = int(reference_preallocations() * max_seq_len * bpt)
    reqs = sharegpt_requests(num_requests, max_seq_len, cap)
    configs = {twin: EngineConfig(twin, args, max_seq_len, dtype, device, BLOCK_SIZE, ignore_eos=True,
                                  cuda_graphs=graphs) for twin in ("naive", "paged")}
    naive_batch = cache_layout(configs["naive"], budget).num_blocks
    paged_batch, _ = find_max_batch(configs["paged"], budget, reqs)
    reqs = reqs[:paged_batch]

    def engine(twin: str, batch: list[Request]) -> Engine:
        blocks = (max_seq_len, BLOCK_SIZE) if twin == "naive" else (BLOCK_SIZE, max_seq_len)
        return build_engine(configs[twin], budget, batch, model, select_backend(attention, device, dtype, *blocks))

    for twin in ("paged", "naive"):  # warm-up: each twin's kernels compiled before the clock runs
        generate(engine(twin, reqs[:2]), [Request(r.request_id, r.prompt_ids[:16], 2) for r in reqs[:2]], device)
    paged_out, paged_s = generate(engine("paged", reqs), reqs, device)
    naive_out, naive_s = [], 0.0
    for i in range(0, len(reqs), naive_batch):
        out, s = generate(engine("naive", reqs[i:i + naive_batch]), reqs[i:i + naive_batch], device)
        naive_out += out
        naive_s += s
    tokens = sum(len(o) for o in paged_out)
    assert tokens == sum(len(o) for o in naive_out), "the twins generated different numbers of tokens"
    return {"cuda_graphs": graphs, "budget_bytes": budget, "max_seq_len": max_seq_len, "answer_cap": cap, "requests": len(reqs),
            "naive_batch": naive_batch, "paged_batch": paged_batch, "output_tokens": tokens,
            "requested_tokens": sum(r.max_new_tokens for r in reqs),
            "naive_tok_per_s": tokens / naive_s, "paged_tok_per_s": tokens / paged_s,
            "identical_requests": sum(a == b for a, b in zip(paged_out, naive_out))}


def correct_part(plan: dict, device: torch.device, dtype: torch.dtype, attentions: tuple[str, ...],
                 save_rows: Callable[[list[dict]], None]) -> tuple[list[dict], torch.nn.Module]:
    """The runs of `correctness_runs(attentions)` on the small model in float32 (its rows then go to
    `save_rows`) and on the large one in `dtype`; returns all rows and the large model (decode and budget
    run it)."""
    small, args = plan["small_args"], plan["args"]
    reqs = random_requests(plan["correct_lengths"], small.vocab_size, seed=1)
    # the naive twin's row: room for the longest request, in whole blocks (flex tiles it in 16 slots)
    max_seq_len = (cdiv(max(len(r.prompt_ids) + r.max_new_tokens for r in reqs), BLOCK_SIZE) + 1) * BLOCK_SIZE
    small_model = build_model(small, random_state_dict(small, 1, device), device, torch.float32, max_seq_len)
    reference = greedy_reference(small_model, reqs, device)
    rows = correctness("small float32", small_model, reference, small, reqs, device, torch.float32, max_seq_len,
                       attentions)
    save_rows(rows)
    del small_model
    # The large model's float32 weights give the reference; the same weights in `dtype` run the engine.
    reqs = random_requests(plan["correct_lengths"], args.vocab_size, seed=2)
    sd = random_state_dict(args, 0, device)
    model = build_model(args, sd, device, dtype, max(plan["prompt"] + plan["steps"] + 1, plan["budget_max_seq_len"]))
    reference = greedy_reference(build_model(args, sd, device, torch.float32, max_seq_len), reqs, device)
    del sd
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows += correctness(f"large {str(dtype).removeprefix('torch.')}", model, reference, args, reqs, device, dtype,
                        max_seq_len, attentions)
    return rows, model


def save(doc: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resume(out: Path | None, parts: list[str], header: dict) -> dict:
    """The results document to fill: a fresh one, or, when only some parts run, the existing `out`
    with those parts to be replaced (so a run cut short on a lent GPU is finished, not redone)."""
    if set(parts) == set(PARTS) or out is None or not out.exists():
        return dict(header)
    doc = json.loads(out.read_text())
    mismatch = [k for k in ("smoke", "device_name", "dtype", "args", "block_size") if doc.get(k) != header[k]]
    if mismatch:
        sys.exit(f"{out} was measured with another {', '.join(mismatch)}; give another --out or run every part")
    return {**doc, "time": header["time"], "torch": header["torch"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on whatever device is here (tests)")
    ap.add_argument("--attention", default="auto", help="the decode steps' backend, as the CLI's --attention")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default: bench/results/gpu/gpu.json; none with --smoke)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="the parts to run (default all); the others are kept from an existing --out file")
    a = ap.parse_args()
    plan = SMOKE_PLAN if a.smoke else FULL
    out = a.out or (None if a.smoke else ROOT / "bench" / "results" / "gpu" / "gpu.json")
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    elif a.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)  # a second thread stalls whenever another process holds the other core
    else:
        sys.exit("bench/gpu.py needs a CUDA GPU (run it with --smoke to check it on this machine)")
    args: ModelArgs = plan["args"]
    doc = resume(out, a.parts, {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": a.smoke, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "args": asdict(args),
        "block_size": BLOCK_SIZE})
    if "copy" in a.parts:
        doc["copy_bytes_per_s"] = copy_bandwidth(device, plan["copy_bytes"], plan["repeats"])
        doc["matmul_flops_per_s"] = matmul_rate(device, dtype, plan["matmul_n"], plan["repeats"])
        log(f"copy bandwidth: {doc['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + written); "
            f"{plan['matmul_n']}^3 matrix product: {doc['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
        save(doc, out)

    if "kernel" in a.parts:
        doc["kernel"] = []
        pool = kernel_pool(args, plan, device, dtype)
        for batch in plan["kernel_batches"]:
            for context in plan["kernel_contexts"]:
                r = kernel_case(args, pool, batch, context, plan["repeats"])
                doc["kernel"].append(r)
                log(f"kernel B={batch} ctx={context}: triton paged {r['paged_us']:.0f} us, SDPA contiguous "
                    f"{r['sdpa_us']:.0f} us, max diff {r['max_abs_diff']:.1e}")
                save(doc, out)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # each case's contiguous copies are gigabytes
        del pool

    model = None
    if "correct" in a.parts:
        doc["correct"], model = correct_part(plan, device, dtype, ("torch", "triton"),
                                             lambda rows: save({**doc, "correct": rows}, out))
        save(doc, out)
    if model is None and ("decode" in a.parts or "budget" in a.parts):
        model = build_model(args, random_state_dict(args, 0, device, dtype), device, dtype,
                            max(plan["prompt"] + plan["steps"] + 1, plan["budget_max_seq_len"]))
    graph_modes = (False, True) if device.type == "cuda" else (False,)  # the CPU smoke's backend is torch
    if "decode" in a.parts:
        if "copy_bytes_per_s" not in doc:
            sys.exit("the decode part's floor needs the ceilings: add --parts copy")
        doc["weight_bytes_read"] = weights = weight_bytes_read(model)
        doc["decode"] = []
        for batch in plan["step_batches"]:
            for twin in ("paged", "naive"):
                for graphs in graph_modes:
                    r = decode_steps(model, args, twin, batch, plan["prompt"], plan["steps"], device, dtype,
                                     a.attention, graphs)
                    r["floor_ms"] = 1e3 * max((weights + r["kv_bytes_read"]) / doc["copy_bytes_per_s"],
                                              2 * weights / dtype.itemsize * batch / doc["matmul_flops_per_s"])
                    if graphs:  # the run before it: the same twin and batch, eager
                        r["identical_to_eager"] = sum(map(list.__eq__, r["tokens"], doc["decode"][-1]["tokens"]))
                    doc["decode"].append(r)
                    log(f"decode {twin} B={batch} ({r['backend']}{', graphs' if graphs else ''}): "
                        f"{r['step_ms']:.2f} ms, floor {r['floor_ms']:.2f} ms")
                for r in doc["decode"][-len(graph_modes):]:
                    del r["tokens"]  # compared; too many to keep
                save(doc, out)

    if "budget" in a.parts:
        doc["same_budget"] = []
        for graphs in graph_modes:
            r = same_budget(model, args, plan["budget_max_seq_len"], plan["budget_requests"], plan["budget_cap"],
                            device, dtype, a.attention, graphs)
            doc["same_budget"].append(r)
            log(f"same KV budget ({r['budget_bytes'] / GIB:.1f} GiB{', graphs' if graphs else ''}): naive batch "
                f"{r['naive_batch']} {r['naive_tok_per_s']:.0f} tok/s, paged batch {r['paged_batch']} "
                f"{r['paged_tok_per_s']:.0f} tok/s, paged / naive {r['paged_tok_per_s'] / r['naive_tok_per_s']:.2f}")
            save(doc, out)

    if "flex" in a.parts:
        model = None  # the part builds its own, as the correct part does
        doc["flex"] = {"problem": flex_problem(device, (BLOCK_SIZE,)), "correct": [], "kernel": []}
        if doc["flex"]["problem"] is None:
            doc["flex"]["correct"] = correct_part(plan, device, dtype, ("flex",), lambda rows: save(
                {**doc, "flex": {**doc["flex"], "correct": rows}}, out))[0]
            save(doc, out)
            pool, flex = kernel_pool(args, plan, device, dtype), FlexAttention(min_batch=1)
            for batch in plan["kernel_batches"]:
                for context in plan["kernel_contexts"]:
                    r = flex_kernel_case(args, pool, batch, context, flex, plan["repeats"])
                    doc["flex"]["kernel"].append(r)
                    log(f"flex kernel B={batch} ctx={context}: " + (r.get("error") or
                        f"{r['flex_us']:.0f} us, max diff {r['max_abs_diff']:.1e}"))
                    save(doc, out)
            del pool, flex
        else:
            log(f"flex: {doc['flex']['problem']}")

    if "flash" in a.parts:
        model = None
        doc["flash"] = flash_cases(args, kernel_pool(args, plan, device, dtype), plan["kernel_batches"],
                                   plan["kernel_contexts"], plan["repeats"])
        log(f"flash-attn: {doc['flash'].get('error') or 'ran'}")
        save(doc, out)
    if out is not None:
        log(f"results: {out}")


if __name__ == "__main__":
    main()

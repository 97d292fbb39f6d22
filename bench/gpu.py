"""The GPU measurements: Llama-3-8B-shaped random weights in bfloat16 on one CUDA device.

1. Copy bandwidth: a device-to-device copy of 2 GiB; bytes read plus bytes written, per second.
2. Decode attention kernel: the project's Triton paged kernel, which follows a block table of
   16-slot blocks scattered through the pool, against PyTorch's SDPA on the same K/V laid out
   contiguously, one query per sequence (a decode step) at several batches and contexts; the
   outputs are compared, and each kernel's K/V bytes per second set against the copy bandwidth.
3. The decode step against its memory-bandwidth floor: the paged twin's decode step (the CLI's
   `--attention auto`: flash-attn if installed, else Triton) at batch 1 to 256, and the naive
   twin's at the same batch, against (bytes of weights + K/V read per step) / copy bandwidth.
   The embedding table is not counted (a step reads one row of it per sequence).
4. Same KV budget, the product's headline case on a real GPU: the budget Llama 3 8B has on a
   24 GB GPU (6.19 preallocations of 8192 tokens), ShareGPT prompts with their reference answer
   lengths capped at 128; the naive twin in consecutive waves of its largest batch (as running
   llama3-naive.py repeatedly), the paged twin at its largest batch; output tokens per second.

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
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pagedllama.attention import select_backend  # noqa: E402
from pagedllama.budget import build_cache, naive_max_rows, reference_preallocations  # noqa: E402
from pagedllama.capacity import find_max_batch  # noqa: E402
from pagedllama.checkpoint import build_model, random_state_dict  # noqa: E402
from pagedllama.config import NAMED_SHAPES, ModelArgs  # noqa: E402
from pagedllama.engine import Engine, Request  # noqa: E402
from pagedllama.sampling import SamplingParams  # noqa: E402
from overhead import BLOCK_SIZE, cache_for  # noqa: E402  (the bench's shared pieces: one cache-sizing rule)

GIB = 1 << 30
PARTS = ("copy", "kernel", "decode", "budget")  # the numbered parts of the docstring
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4352, hidden_dim=160)  # demo tokenizer's vocab
FULL = {"args": NAMED_SHAPES["llama3-8b"], "copy_bytes": 2 * GIB, "kernel_batches": (1, 16, 64, 256),
        "kernel_contexts": (1024, 4096), "step_batches": (1, 16, 64, 256), "prompt": 512, "steps": 16, "repeats": 20,
        "budget_max_seq_len": 8192, "budget_requests": 256, "budget_cap": 128}
SMOKE_PLAN = {"args": TINY, "copy_bytes": 1 << 20, "kernel_batches": (1, 3), "kernel_contexts": (40,),
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


def kernel_case(args: ModelArgs, batch: int, context: int, device: torch.device, dtype: torch.dtype,
                repeats: int) -> dict:
    """Decode attention over `context` keys per sequence: Triton through the block table vs SDPA on a
    contiguous (batch, kv_heads, context, head_dim) copy of the same K/V."""
    from pagedllama.triton_attention import paged_attention

    g = torch.Generator(device).manual_seed(batch * 100003 + context)
    hkv, h, d = args.n_kv_heads, args.n_heads, args.head_dim
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    k_cache, v_cache = (torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=g, device=device, dtype=dtype)
                        for _ in range(2))
    block_table = torch.randperm(num_blocks, generator=g, device=device).view(batch, blocks_per_seq).int()
    q = torch.randn(batch, h, d, generator=g, device=device, dtype=dtype)
    context_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
    k_dense, v_dense = (c[block_table.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
                        for c in (k_cache, v_cache))
    scale = d ** -0.5

    def paged():
        return paged_attention(q, k_cache, v_cache, block_table, context_lens, query_start_loc, 1, context, scale)

    def sdpa():
        return F.scaled_dot_product_attention(q[:, :, None], k_dense, v_dense, scale=scale, enable_gqa=True)[:, :, 0]

    diff = (paged().float() - sdpa().float()).abs().max().item()
    clock = timer(device)
    t_paged, t_sdpa = clock(paged, repeats), clock(sdpa, repeats)
    kv_bytes = 2 * batch * context * hkv * d * k_cache.element_size()
    return {"batch": batch, "context": context, "kv_bytes": kv_bytes, "paged_us": 1e6 * t_paged,
            "sdpa_us": 1e6 * t_sdpa, "paged_bytes_per_s": kv_bytes / t_paged, "sdpa_bytes_per_s": kv_bytes / t_sdpa,
            "max_abs_diff": diff}


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter but the embedding table."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("tok_embeddings"))


def decode_steps(model, args: ModelArgs, twin: str, batch: int, prompt: int, steps: int, device: torch.device,
                 dtype: torch.dtype, attention: str) -> dict:
    """Median decode-step time of one twin at `batch`, every sequence `prompt` tokens into its context."""
    g = torch.Generator().manual_seed(batch)
    reqs = [Request(f"r{i}", torch.randint(1, args.vocab_size, (prompt,), generator=g).tolist(), steps + 1)
            for i in range(batch)]
    max_seq_len = prompt + steps + 1
    blocks = (max_seq_len, BLOCK_SIZE) if twin == "naive" else (BLOCK_SIZE, max_seq_len)
    backend = select_backend(attention, device, dtype, *blocks)  # `auto`: one kernel for both twins
    cache = cache_for(args, twin, reqs, True, dtype, max_seq_len, backend, device)  # room for the whole batch
    engine = Engine(model, cache, SamplingParams(), frozenset(), ignore_eos=True, max_prefill_tokens=32768)
    engine.add(reqs)
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
    return {"twin": twin, "batch": batch, "backend": cache.backend.name, "step_ms": 1e3 * statistics.median(times),
            "mean_context": context, "kv_bytes_read": batch * context * args.kv_bytes_per_token(dtype.itemsize)}


def generate(model, cache, reqs: list[Request], device: torch.device) -> tuple[list[list[int]], float]:
    """Every request to its length (greedy, EOS ignored): the output tokens and the seconds it took."""
    engine = Engine(model, cache, SamplingParams(), frozenset(), ignore_eos=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = engine.run(reqs, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [s.output_ids for s in result.sequences], time.perf_counter() - t0


def same_budget(model, args: ModelArgs, max_seq_len: int, num_requests: int, cap: int, device: torch.device,
                dtype: torch.dtype, attention: str) -> dict:
    """Output tokens per second of each twin at its largest batch within the same KV budget."""
    from common import sharegpt_requests  # the shipped ShareGPT sample, tokenized as the demo does

    bpt = args.kv_bytes_per_token(dtype.itemsize)
    budget = int(reference_preallocations() * max_seq_len * bpt)
    reqs = sharegpt_requests(num_requests, max_seq_len, cap)
    naive_batch = naive_max_rows(budget, max_seq_len, bpt)
    paged_batch, _ = find_max_batch("paged", args, reqs, budget, max_seq_len, dtype, BLOCK_SIZE)
    reqs = reqs[:paged_batch]

    def cache(twin: str, batch: list[Request]):
        blocks = (max_seq_len, BLOCK_SIZE) if twin == "naive" else (BLOCK_SIZE, max_seq_len)
        return build_cache(twin, args, batch, budget, max_seq_len, select_backend(attention, device, dtype, *blocks),
                           device, dtype, block_size=None if twin == "naive" else BLOCK_SIZE)

    for twin in ("paged", "naive"):  # warm-up: each twin's kernels compiled before the clock runs
        generate(model, cache(twin, reqs[:2]), [Request(r.request_id, r.prompt_ids[:16], 2) for r in reqs[:2]], device)
    paged_out, paged_s = generate(model, cache("paged", reqs), reqs, device)
    naive_out, naive_s = [], 0.0
    for i in range(0, len(reqs), naive_batch):
        out, s = generate(model, cache("naive", reqs[i:i + naive_batch]), reqs[i:i + naive_batch], device)
        naive_out += out
        naive_s += s
    tokens = sum(len(o) for o in paged_out)
    assert tokens == sum(len(o) for o in naive_out), "the twins generated different numbers of tokens"
    return {"budget_bytes": budget, "max_seq_len": max_seq_len, "answer_cap": cap, "requests": len(reqs),
            "naive_batch": naive_batch, "paged_batch": paged_batch, "output_tokens": tokens,
            "requested_tokens": sum(r.max_new_tokens for r in reqs),
            "naive_tok_per_s": tokens / naive_s, "paged_tok_per_s": tokens / paged_s,
            "identical_requests": sum(a == b for a, b in zip(paged_out, naive_out))}


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
        log(f"copy bandwidth: {doc['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + written)")
        save(doc, out)

    if "kernel" in a.parts:
        doc["kernel"] = []
        for batch in plan["kernel_batches"]:
            for context in plan["kernel_contexts"]:
                r = kernel_case(args, batch, context, device, dtype, plan["repeats"])
                doc["kernel"].append(r)
                log(f"kernel B={batch} ctx={context}: triton paged {r['paged_us']:.0f} us, SDPA contiguous "
                    f"{r['sdpa_us']:.0f} us, max diff {r['max_abs_diff']:.1e}")
                save(doc, out)

    model = None
    if "decode" in a.parts or "budget" in a.parts:
        model = build_model(args, random_state_dict(args, 0, device, dtype), device, dtype,
                            max(plan["prompt"] + plan["steps"] + 1, plan["budget_max_seq_len"]))
    if "decode" in a.parts:
        if "copy_bytes_per_s" not in doc:
            sys.exit("the decode part's floor needs the copy bandwidth: add --parts copy")
        doc["weight_bytes_read"] = weights = weight_bytes_read(model)
        doc["decode"] = []
        for batch in plan["step_batches"]:
            for twin in ("paged", "naive"):
                r = decode_steps(model, args, twin, batch, plan["prompt"], plan["steps"], device, dtype, a.attention)
                r["floor_ms"] = 1e3 * (weights + r["kv_bytes_read"]) / doc["copy_bytes_per_s"]
                doc["decode"].append(r)
                log(f"decode {twin} B={batch} ({r['backend']}): {r['step_ms']:.2f} ms, floor {r['floor_ms']:.2f} ms")
                save(doc, out)

    if "budget" in a.parts:
        doc["same_budget"] = r = same_budget(model, args, plan["budget_max_seq_len"], plan["budget_requests"],
                                             plan["budget_cap"], device, dtype, a.attention)
        log(f"same KV budget ({r['budget_bytes'] / GIB:.1f} GiB): naive batch {r['naive_batch']} "
            f"{r['naive_tok_per_s']:.0f} tok/s, paged batch {r['paged_batch']} {r['paged_tok_per_s']:.0f} tok/s, "
            f"paged / naive {r['paged_tok_per_s'] / r['naive_tok_per_s']:.2f}")
        save(doc, out)
    if out is not None:
        log(f"results: {out}")


if __name__ == "__main__":
    main()

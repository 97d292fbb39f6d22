"""How close decode comes to this machine's limit, and what reading K/V blocks in place buys.

1. The limit's own measurement: read bandwidth (a sum over 512 MiB) and the matmul peak (a 2048^3
   GEMM) per dtype, one thread.
2. Decode attention alone, 100M preset head shapes (12 query / 4 KV heads of 64), blocks of 16,
   every sequence at the same context: the torch backend (gather the blocks, then SDPA) against the
   flex backend (FlexAttention reading them in place), per layer over a 12-layer step (the step's
   plan or block mask is built once, as in the engine), against the bytes floor (K/V bytes / read
   bandwidth). Contexts 256-8192 x batch 1-256 up to 128K cached tokens.
3. A whole decode step of the 100M preset (random weights, paged twin, context ~280) at batch 1,
   16 and 64 through each backend, against max(weights + K/V bytes / bandwidth, FLOPs / peak).

4. A prompt chunk of 64 or 512 tokens after 1024 or 4096 cached ones (prefix caching, chunked
   prefill): its attention per layer through each backend.
5. Part 2's decode attention at block sizes 16, 32 and 64 (flex reads a block as one tile of that
   many slots; a larger block wastes more: up to block - 1 slots per request).

Backends alternate call by call (2, 4, 5) or step by step (3) in one process; medians of repeats with
their range.

    python bench/decode_limit.py [--quick] [--dtypes float32,bfloat16] [--parts attention step chunk blocks]

Results: bench/results/<BENCH_DTYPE>/decode_limit_<dtype>.json, written as each dtype finishes.
"""
from __future__ import annotations

import json
import statistics
from functools import partial
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import MODELS, RESULTS, bench_parser, describe_model, load_model, log, machine, parse, save_json  # noqa: E402

from pagedllama.engine.block_manager import BlockManager  # noqa: E402
from pagedllama.engine.config import CacheLayout, EngineConfig  # noqa: E402
from pagedllama.engine.sequence import Sequence  # noqa: E402
from pagedllama.model.attention import TorchAttention  # noqa: E402
from pagedllama.model.flex_attention import FlexAttention  # noqa: E402
from pagedllama.model.model_runner import ModelRunner  # noqa: E402

CPU = torch.device("cpu")
BLOCK = 16
MODEL = "100m"
# flex at every batch, and for prompt chunks too (both switched off by default where it lost here)
BACKENDS = {"torch": TorchAttention, "flex": partial(FlexAttention, min_batch=1, chunks_in_place=True)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_CACHED_TOKENS = 128 * 1024  # 12 layers of K/V per backend: 3 GiB each in float32


def load_json(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def median_range(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def read_bandwidth_gbs(repeats: int = 7) -> float:
    """Bytes per second a sum streams from memory (float32, 512 MiB: far past the caches)."""
    x = torch.ones(128 * 1024 * 1024)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a square `F.linear`, the call every projection makes (a plain `a @ b` in bfloat16
    takes a far slower path on CPUs without bfloat16 instructions)."""
    x, w = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    F.linear(x, w)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.linear(x, w)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def steady_batch(runner: ModelRunner, manager: BlockManager, batch: int, context: int, seed: int = 0):
    """`batch` sequences whose first `context` tokens sit in the cache (their K/V random: timing
    does not depend on the values), in blocks handed out in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    manager.allocator._free.clear()
    manager.allocator._free.extend(torch.randperm(manager.allocator.num_blocks, generator=g).tolist())
    seqs = [Sequence(i, str(i), torch.randint(0, 256, (context,), generator=g).tolist(), context, 1 << 20, row=i)
            for i in range(batch)]
    for seq in seqs:
        manager.allocate(seq)
    manager.commit(seqs, True)
    for seq in seqs:  # the token this step feeds
        seq.token_ids.append(0)
        manager.grow(seq, seq.num_tokens)
    return seqs


def runner_for(args, dtype, batch: int, context: int, backend, model=None,
               block: int = BLOCK) -> tuple[ModelRunner, BlockManager]:
    max_seq_len = context + 2 * block
    layout = CacheLayout(block, batch * (-(-max_seq_len // block)) + 1)
    config = EngineConfig("paged", args, max_seq_len, dtype, CPU, block)
    manager = BlockManager(layout, max_seq_len, batch)
    runner = ModelRunner(config, model, layout, batch, backend)
    runner.cache.kv.normal_()
    return runner, manager


def attention_case(args, dtype, batch: int, context: int, rounds: int, bandwidth: float, block: int = BLOCK) -> dict:
    """Per-layer decode attention time, each backend on its own copy of one cache state, and the
    bytes floor (K/V bytes / read bandwidth)."""
    runs = {}
    for name, cls in BACKENDS.items():  # every layer its own K/V, as in a step: no layer reads another's from cache
        runner, manager = runner_for(args, dtype, batch, context, cls(), block=block)
        seqs = steady_batch(runner, manager, batch, context)
        runs[name] = runner, seqs, manager
    h, hkv, d = args.n_heads, args.n_kv_heads, args.head_dim
    q = torch.randn(batch, h, d).to(dtype)
    k, v = torch.randn(batch, hkv, d).to(dtype), torch.randn(batch, hkv, d).to(dtype)
    times: dict[str, list[float]] = {name: [] for name in BACKENDS}
    for r in range(rounds + 1):  # round 0 warms up (and compiles)
        for name in (list(BACKENDS) if r % 2 else list(BACKENDS)[::-1]):
            runner, seqs, manager = runs[name]
            _, _, meta = runner.prepare(seqs, False, manager.block_tables)
            cache = runner.cache
            t0 = time.perf_counter()
            for layer in range(args.n_layers):
                cache.attend(layer, q, k, v, meta)
            if r:
                times[name].append((time.perf_counter() - t0) / args.n_layers * 1e3)
    kv_bytes = batch * (context + 1) * 2 * hkv * d * dtype.itemsize
    case = {"batch": batch, "context": context, "block_size": block, "kv_bytes_per_layer": kv_bytes,
            "floor_ms": kv_bytes / bandwidth * 1e3, "ms": {name: median_range(t) for name, t in times.items()}}
    log(f"  attention B={batch:3d} ctx={context:4d} block {block}: " + ", ".join(
        f"{n} {case['ms'][n]['median']:.3f} ms" for n in BACKENDS) + f" (floor {case['floor_ms']:.3f})")
    return case


def chunk_case(args, dtype, cached: int, chunk: int, rounds: int) -> dict:
    """A prompt chunk of `chunk` tokens after `cached` tokens already in the cache (prefix caching,
    chunked prefill): its attention per layer, each backend on its own copy of the cache state."""
    runs = {}
    for name, cls in BACKENDS.items():
        runner, manager = runner_for(args, dtype, 1, cached + chunk, cls())
        seq = steady_batch(runner, manager, 1, cached)[0]
        seq.token_ids += [0] * (chunk - 1)
        manager.grow(seq, seq.num_tokens)
        seq.num_cached_tokens = cached  # the chunk is what this prefill step feeds
        runs[name] = runner, [seq], manager
    h, hkv, d = args.n_heads, args.n_kv_heads, args.head_dim
    q = torch.randn(chunk, h, d).to(dtype)
    k, v = torch.randn(chunk, hkv, d).to(dtype), torch.randn(chunk, hkv, d).to(dtype)
    times: dict[str, list[float]] = {name: [] for name in BACKENDS}
    for r in range(rounds + 1):
        for name in (list(BACKENDS) if r % 2 else list(BACKENDS)[::-1]):
            runner, seqs, manager = runs[name]
            _, _, meta = runner.prepare(seqs, True, manager.block_tables)
            t0 = time.perf_counter()
            for layer in range(args.n_layers):
                runner.cache.attend(layer, q, k, v, meta)
            if r:
                times[name].append((time.perf_counter() - t0) / args.n_layers * 1e3)
    return {"cached": cached, "chunk": chunk, "ms": {name: median_range(t) for name, t in times.items()}}


def step_case(model, dtype, batch: int, context: int, rounds: int) -> dict:
    """A whole decode step (forward and attention over all layers), per backend, alternating."""
    runs = {}
    for name, cls in BACKENDS.items():
        runner, manager = runner_for(model.args, dtype, batch, context + rounds + 2, cls(), model)
        runs[name] = runner, steady_batch(runner, manager, batch, context), manager
    times: dict[str, list[float]] = {name: [] for name in BACKENDS}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for name in (list(BACKENDS) if r % 2 else list(BACKENDS)[::-1]):
                runner, seqs, manager = runs[name]
                t0 = time.perf_counter()
                runner.run(seqs, False, None, manager.block_tables)
                if r:
                    times[name].append((time.perf_counter() - t0) * 1e3)
                for seq in seqs:
                    seq.token_ids.append(0)
                    manager.grow(seq, seq.num_tokens)
                manager.commit(seqs, False)
    return {"batch": batch, "context": context, "ms": {name: median_range(t) for name, t in times.items()}}


def matmuls_alone_ms(model, batch: int, rounds: int) -> dict:
    """The step's projections alone (every `nn.Linear` of the model, in order, at this batch): what
    this CPU's matrix kernels make of the step's FLOPs, the ceiling under attention and the rest."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights}
    times = []
    with torch.inference_mode():
        for r in range(rounds + 1):
            t0 = time.perf_counter()
            for w in weights:
                F.linear(x[w.shape[1]], w)
            if r:
                times.append((time.perf_counter() - t0) * 1e3)
    return median_range(times)


def step_limit_ms(model, dtype, batch: int, context: int, bandwidth: float, peak: float) -> dict:
    """The step's floor: every weight read once (the embedding table only for the batch's rows) and
    every cached K/V row once, at the read bandwidth; or its FLOPs at the matmul peak."""
    args = model.args
    dense = sum(p.numel() for p in model.parameters()) - args.vocab_size * args.dim  # all but the embedding
    weight_bytes = (dense + batch * args.dim) * dtype.itemsize
    kv_bytes = batch * (context + 1) * args.kv_bytes_per_token(dtype.itemsize)
    flops = 2 * dense * batch + 4 * batch * (context + 1) * args.n_layers * args.n_heads * args.head_dim
    bytes_ms, flops_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3, flops / peak * 1e3
    return {"bytes_ms": bytes_ms, "flops_ms": flops_ms, "limit_ms": max(bytes_ms, flops_ms),
            "bound": "memory" if bytes_ms >= flops_ms else "compute"}


PARTS = ("attention", "step", "chunk", "blocks")
BLOCK_SIZES = (16, 32, 64)
BLOCK_CASES = ((16, 1024), (16, 4096), (64, 1024))  # (batch, context)


def run(quick: bool, dtypes: list[str], parts: tuple[str, ...] = PARTS) -> dict:
    """Measure `parts` in each dtype; the other parts keep what the dtype's results file holds."""
    torch.set_num_threads(1)
    args = MODELS[MODEL]
    bandwidth = 1e9 * read_bandwidth_gbs()
    doc: dict = {"model": describe_model(MODEL), "block_size": BLOCK, "quick": quick,
                 "read_bandwidth_gbs": bandwidth / 1e9, "dtypes": {}}
    log(f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    contexts = [256, 1024] if quick else [256, 1024, 4096, 8192]
    batches = [1, 16, 64] if quick else [1, 16, 64, 256]
    rounds = 3 if quick else 7
    for dname in dtypes:
        dtype = DTYPES[dname]
        peak = 1e9 * matmul_peak_gflops(dtype)
        name = f"decode_limit_{dname}" + ("_quick" if quick else "")
        kept = load_json(name) if set(parts) != set(PARTS) else None
        if kept:
            doc.update({k: kept[k] for k in ("read_bandwidth_gbs",)})
            out = doc["dtypes"][dname] = kept["dtypes"][dname]
            bandwidth, peak = 1e9 * doc["read_bandwidth_gbs"], 1e9 * out["matmul_peak_gflops"]
        else:
            out = doc["dtypes"][dname] = {"matmul_peak_gflops": peak / 1e9}
        out.update({part: [] for part in parts})
        stamp = f"{time.strftime('%Y-%m-%d %H:%M')}, commit {machine()['git_commit']}"
        out["measured"] = {**out.get("measured", {}), **{part: stamp for part in parts}}
        log(f"{dname}: matmul peak {peak / 1e9:.0f} GFLOP/s")
        for context in contexts if "attention" in parts else []:
            for batch in batches:
                if batch * context > MAX_CACHED_TOKENS:
                    continue
                out["attention"].append(attention_case(args, dtype, batch, context, rounds, bandwidth))
        for batch, context in BLOCK_CASES if "blocks" in parts else []:
            out["blocks"] += [attention_case(args, dtype, batch, context, rounds, bandwidth, block)
                              for block in BLOCK_SIZES]
        for cached in [1024, 4096] if "chunk" in parts else []:
            for chunk in (64, 512):
                out["chunk"].append(chunk_case(args, dtype, cached, chunk, rounds))
                log(f"  chunk of {chunk} after {cached}: " + ", ".join(
                    f"{n} {out['chunk'][-1]['ms'][n]['median']:.3f} ms" for n in BACKENDS))
        model = load_model(MODEL, dtype) if "step" in parts else None
        for batch in ([1, 64] if quick else [1, 16, 64]) if "step" in parts else []:
            case = step_case(model, dtype, batch, 280, rounds)
            case.update(step_limit_ms(model, dtype, batch, 280, bandwidth, peak))
            case["matmuls_alone_ms"] = matmuls_alone_ms(model, batch, rounds)
            out["step"].append(case)
            log(f"  step B={batch}: " + ", ".join(f"{n} {case['ms'][n]['median']:.1f} ms" for n in BACKENDS)
                + f" (limit {case['limit_ms']:.1f} ms, {case['bound']}-bound)")
        save_json(name, {**doc, "dtypes": {dname: out}})
    return doc


if __name__ == "__main__":
    ap = bench_parser(__doc__)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    a = parse(ap)
    run(a.quick, a.dtypes.split(","), tuple(a.parts))

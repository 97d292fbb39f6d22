"""Does torch.compile pay for the torch backend's decode attention on this CPU?

Times `TorchAttention._decode` eager and compiled (inductor, dynamic shapes) on one layer of the
100M preset's shape, over ShareGPT-like contexts (the shipped data's prompt lengths plus half their
answers, the first 82 requests), in float32 and bfloat16, interleaved, and the compile time a
process pays before its first step. A second batch checks whether a new shape recompiles.

    python bench/compile_probe.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_100M, log, save_json, set_threads, sharegpt_requests  # noqa: E402

from pagedllama.attention import TorchAttention, plan_decode_chunks  # noqa: E402

BLOCK = 16


def case(contexts: list[int], dtype: torch.dtype, seed: int = 0):
    """A scattered paged cache holding `contexts`, one query per sequence, and its chunk plan."""
    g = torch.Generator().manual_seed(seed)
    a = BENCH_100M
    blocks = [-(-c // BLOCK) for c in contexts]
    num_blocks = sum(blocks) + 1
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(contexts), max(blocks), dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[start:start + n].int()
        start += n
    k = torch.randn(num_blocks, BLOCK, a.n_kv_heads, a.head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, BLOCK, a.n_kv_heads, a.head_dim, generator=g).to(dtype)
    q = torch.randn(len(contexts), a.n_heads, a.head_dim, generator=g).to(dtype)
    chunks = plan_decode_chunks(tables, torch.tensor(contexts, dtype=torch.int32), BLOCK)
    return q, k, v, chunks, a.head_dim ** -0.5


def median_ms(fn, args, repeats: int = 15) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn(*args)
        times.append(time.process_time() - t)
    return 1e3 * statistics.median(times)


def run() -> dict:
    reqs = sharegpt_requests(164)
    contexts = [len(r.prompt_ids) + r.max_new_tokens // 2 for r in reqs]
    first, second = contexts[:82], contexts[82:]
    doc: dict = {"contexts": {"first": first, "second": second}, "dtypes": {}}
    for dtype in (torch.float32, torch.bfloat16):
        label = str(dtype).removeprefix("torch.")
        eager = TorchAttention()
        compiled_backend = TorchAttention()
        compiled = torch.compile(compiled_backend._decode, dynamic=True)
        args = case(first, dtype)
        t = time.perf_counter()
        compiled(*args)
        compile_s = time.perf_counter() - t
        torch.testing.assert_close(compiled(*args), eager._decode(*args))
        rows = {"eager_ms": [], "compiled_ms": []}
        for r in range(3):
            for name, fn in (("eager_ms", eager._decode), ("compiled_ms", compiled))[::1 if r % 2 == 0 else -1]:
                rows[name].append(median_ms(fn, args))
        args2 = case(second, dtype, seed=1)
        t = time.perf_counter()
        compiled(*args2)
        second_shape_s = time.perf_counter() - t
        res = {"compile_s": compile_s, "second_shape_first_call_s": second_shape_s,
               "eager_ms": statistics.median(rows["eager_ms"]), "compiled_ms": statistics.median(rows["compiled_ms"]),
               "second_shape_eager_ms": median_ms(eager._decode, args2),
               "second_shape_compiled_ms": median_ms(compiled, args2)}
        res["speedup"] = res["eager_ms"] / res["compiled_ms"]
        doc["dtypes"][label] = res
        log(f"  {label}: eager {res['eager_ms']:.1f} ms, compiled {res['compiled_ms']:.1f} ms "
            f"({res['speedup']:.2f}x) after {compile_s:.0f} s of compiling; a new batch shape: "
            f"{second_shape_s:.1f} s first call")
    save_json("compile_probe", doc)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1 or $BENCH_THREADS)")
    set_threads(ap.parse_args().threads)
    doc = run()
    print(f"{'dtype':<10} {'eager ms':>9} {'compiled ms':>12} {'speedup':>8} {'compile s':>10} {'new shape s':>12}")
    for label, r in doc["dtypes"].items():
        print(f"{label:<10} {r['eager_ms']:9.1f} {r['compiled_ms']:12.1f} {r['speedup']:8.2f} {r['compile_s']:10.0f} "
              f"{r['second_shape_first_call_s']:12.1f}")


if __name__ == "__main__":
    main()

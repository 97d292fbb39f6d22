"""Does torch.compile pay for the torch backend's decode attention on this CPU?

Times two decode attentions eager and compiled (inductor, dynamic shapes): the package's
`TorchAttention._decode` (groups of similar context length, one padded SDPA each, K/V gathered
into kept scratch buffers) and the split-K decode it replaced (bench/baselines.py: thousands of
tiny matmuls, the kind of graph a compiler could fuse). One layer of the 100M preset's shape,
over ShareGPT-like contexts (the shipped data's prompt lengths plus half their answers, the
first 82 requests), float32 and bfloat16, interleaved; plus the compile time a process pays
before its first step, and the first call at a new batch shape.

    python bench/compile_probe.py
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_100M, log, save_json, bench_parser, parse, sharegpt_requests  # noqa: E402  (sets the path)
from baselines import SplitKTorchAttention, plan_decode_chunks  # noqa: E402

from pagedllama.model.attention import TorchAttention, plan_decode_groups  # noqa: E402

BLOCK = 16


def case(contexts: list[int], dtype: torch.dtype, seed: int = 0) -> dict[str, tuple]:
    """A scattered paged cache holding `contexts`, one query per sequence, and each decode's
    arguments (its per-step plan made once, outside the timing)."""
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
    scale = a.head_dim ** -0.5
    return {"package": (q, k, v, plan_decode_groups(contexts, tables), scale),
            "split_k": (q, k, v, plan_decode_chunks(tables, torch.tensor(contexts, dtype=torch.int32), BLOCK), scale)}


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
        args, args2 = case(first, dtype), case(second, dtype, seed=1)
        fns, res = {}, {}
        for name, make in (("package", lambda: TorchAttention()._decode),
                           ("split_k", lambda: SplitKTorchAttention()._split_k)):
            eager, compiled = make(), torch.compile(make(), dynamic=True)
            t = time.perf_counter()
            torch.testing.assert_close(compiled(*args[name]), eager(*args[name]))
            res[f"{name}_compile_s"] = time.perf_counter() - t
            t = time.perf_counter()
            compiled(*args2[name])
            res[f"{name}_new_shape_s"] = time.perf_counter() - t
            fns[f"{name}_eager"], fns[f"{name}_compiled"] = (eager, args[name]), (compiled, args[name])
        times: dict[str, list[float]] = {name: [] for name in fns}
        for r in range(3):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                times[name].append(median_ms(*fns[name]))
        res.update({f"{name}_ms": statistics.median(t) for name, t in times.items()})
        doc["dtypes"][label] = res
        log(f"  {label}: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()))
    save_json("compile_probe", doc)
    return doc


def main() -> None:
    parse(bench_parser(__doc__, quick=False))
    doc = run()
    for label, r in doc["dtypes"].items():
        print(f"{label}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))

if __name__ == "__main__":
    main()

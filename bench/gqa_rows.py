"""Decode SDPA with grouped-query attention: a single-row query per head, or a KV head's query heads
as the rows of one query, in float32 and bfloat16, alternated in one process.

The torch backend's decode (`TorchAttention._decode_sdpa`) takes the rows form in float32 and
the per-head form (`enable_gqa`) otherwise; this is the measurement behind that choice. K/V are
laid out as the backend's gather leaves them, (batch, context, KV heads, head_dim) seen through a
transpose, and every sequence attends to its whole context (no mask), at the head shapes of the
demo, the 100M preset and Llama 3 8B.

    python bench/gqa_rows.py [--quick]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, save_json, bench_parser, parse  # noqa: E402

from pagedllama.model.attention import sdpa_per_head, sdpa_query_rows  # noqa: E402

SHAPES = {"demo": (2, 2, 64), "100m": (4, 3, 64), "Llama 3 8B": (8, 4, 128)}  # KV heads, query heads per KV head, D
CASES = ((6, 620), (32, 240), (97, 300))  # batch, context
ROUNDS = 7


def forms(batch: int, context: int, kv_heads: int, group: int, head_dim: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen).to(dtype)
    keys, values = (torch.randn(batch, context, kv_heads, head_dim, generator=gen).to(dtype).transpose(1, 2)
                    for _ in range(2))
    scale = head_dim ** -0.5
    return {"per head": lambda: sdpa_per_head(q, keys, values, None, scale),
            "rows": lambda: sdpa_query_rows(q, keys, values, None, scale)}


def ms_per_call(fn, calls: int) -> float:
    fn()
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return 1e3 * (time.process_time() - t0) / calls


def run(quick: bool) -> dict:
    doc: dict = {"rows": []}
    for dtype in (torch.float32, torch.bfloat16):
        for shape, (kv_heads, group, head_dim) in SHAPES.items():
            for batch, context in CASES[:1] if quick else CASES:
                fns = forms(batch, context, kv_heads, group, head_dim, dtype)
                times: dict[str, list[float]] = {name: [] for name in fns}
                for r in range(ROUNDS):
                    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                        times[name].append(ms_per_call(fns[name], 5))
                row = {"dtype": str(dtype).removeprefix("torch."), "shape": shape, "kv_heads": kv_heads,
                       "group": group, "head_dim": head_dim, "batch": batch, "context": context,
                       **{name: statistics.median(t) for name, t in times.items()}}
                doc["rows"].append(row)
                log(f"  {row['dtype']} {shape} B={batch} L={context}: per head {row['per head']:.2f} ms, "
                    f"rows {row['rows']:.2f} ms")
    save_json("gqa_rows" + ("_quick" if quick else ""), doc)
    return doc


def main() -> None:
    run(parse(bench_parser(__doc__, quick_help="one batch size")).quick)


if __name__ == "__main__":
    main()

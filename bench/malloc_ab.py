"""What keeping freed memory (pagedllama/host_memory.py, the CLI's CPU setting) buys over glibc's
default malloc, which mmaps every large block afresh and faults it in page by page.

The setting is process-wide and cannot be undone, so each side runs in processes of its own,
alternated (default, kept, thp, then thp, kept, default, ...), `--repeats` of each. A process
builds the model, then three times over runs one prefill of the first 16 ShareGPT prompts (about
4,100 demo-tokenizer tokens in one step, as `llama3-paged.py 16` does) and the 8 decode steps
after it, timing each step in CPU time and counting its minor page faults; it reports the
medians. Both dtypes, the demo and the 100M preset. Ratios are to glibc's default, paired by
round. The third side, thp, leaves glibc alone and sets PyTorch's THP_MEM_ALLOC_ENABLE instead
(transparent huge pages for its large CPU blocks, where the kernel allows them).

    python bench/malloc_ab.py [--quick] [--repeats N]
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (budget_for_rows, load_model, log, make_cache, parse, bench_parser, print_summary,  # noqa: E402
                    ratio_summary, save_json, sharegpt_requests)


# Each side's environment. thp: glibc's defaults, but PyTorch asks the kernel for transparent huge
# pages (2 MiB, one fault each) for its CPU blocks of 2 MiB and more.
SIDES = {"default": {"BENCH_KEEP_FREED_MEMORY": "0"},
         "kept": {"BENCH_KEEP_FREED_MEMORY": "1"},
         "thp": {"BENCH_KEEP_FREED_MEMORY": "0", "THP_MEM_ALLOC_ENABLE": "1"}}
DECODE_STEPS = 8


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(model_name: str, rounds: int = 3) -> dict:
    """In this process: medians over `rounds` fresh engines of the prefill step and of its decode steps."""
    reqs = sharegpt_requests(16)
    model = load_model(model_name)
    prefill, prefill_faults, decode, decode_faults = [], [], [], []
    for _ in range(rounds):
        engine = make_cache("paged", model_name, reqs, budget_for_rows(model_name, len(reqs))).engine(model, reqs)
        engine.add(reqs)
        for i in range(1 + DECODE_STEPS):
            f0, t0 = faults(), time.process_time()
            engine.step()
            dt, df = time.process_time() - t0, faults() - f0
            (prefill if i == 0 else decode).append(dt)
            (prefill_faults if i == 0 else decode_faults).append(df)
    return {"prefill_tokens": sum(len(r.prompt_ids) for r in reqs), "prefill_ms": 1e3 * statistics.median(prefill),
            "prefill_faults": statistics.median(prefill_faults), "decode_ms": 1e3 * statistics.median(decode),
            "decode_faults": statistics.median(decode_faults)}


def child(side: str, dtype: str, model_name: str) -> dict:
    env = {**os.environ, **SIDES[side], "BENCH_DTYPE": dtype}
    out = subprocess.run([sys.executable, __file__, "--child", model_name], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(quick: bool, repeats: int) -> dict:
    models = ["demo"] if quick else ["demo", "100m"]
    doc: dict = {"quick": quick, "repeats": repeats, "cases": []}
    for dtype in ("bfloat16", "float32"):
        for model_name in models:
            sides: dict[str, list[dict]] = {s: [] for s in SIDES}
            for r in range(repeats):
                for side in (list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]):
                    sides[side].append(child(side, dtype, model_name))
                log(f"  {dtype} {model_name} round {r + 1}: " + ", ".join(
                    f"{s} prefill {v[-1]['prefill_ms']:.0f} ms ({v[-1]['prefill_faults']:.0f} faults), "
                    f"decode {v[-1]['decode_ms']:.1f} ms" for s, v in sides.items()))
            case = {"dtype": dtype, "model": model_name, "prefill_tokens": sides["kept"][0]["prefill_tokens"],
                    "runs": sides}
            for key in ("prefill_ms", "decode_ms", "prefill_faults"):
                case[key] = {s: statistics.median(x[key] for x in v) for s, v in sides.items()}
            for key in ("prefill_ms", "decode_ms"):
                case[key.replace("_ms", "_ratio")] = {
                    s: ratio_summary([x[key] for x in v], [x[key] for x in sides["default"]])
                    for s, v in sides.items() if s != "default"}
            doc["cases"].append(case)
    save_json("malloc_ab" + ("_quick" if quick else ""), doc)
    return doc


def summary_rows(doc: dict) -> list[tuple]:
    return [(f"{key.removesuffix('_ratio')} time, {side} / default ({c['dtype']}, {c['model']})", r["median"],
             "< 1", r["median"] < 1, None)
            for c in doc["cases"] for key in ("prefill_ratio", "decode_ratio") for side, r in c[key].items()]


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(measure(sys.argv[2])))
        return
    a = parse(bench_parser(__doc__, repeats=True))
    print_summary(summary_rows(run(a.quick, a.repeats)))


if __name__ == "__main__":
    main()

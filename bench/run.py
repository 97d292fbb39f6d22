"""All benchmarks, ending with one summary table of measured ratios and their targets.

    python bench/run.py --quick   # a few minutes on 2 CPU cores: demo model, short workloads
    python bench/run.py           # full (about 1 h 15 min here): demo and the 100M preset, longer
                                  # workloads, batch scaling, decode profile

Progress goes to stderr; the table to stdout. Results: bench/results/*.json and *.png
(`_quick` in the names for the quick mode), the table also as bench/results/summary[_quick].md.
Every ratio is the median of paired, interleaved repeats measured in this one process.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_compare  # noqa: E402
import overhead  # noqa: E402
import throughput  # noqa: E402
from common import RESULTS, describe_model, log, machine, save_json, set_threads  # noqa: E402


def table(rows: list[tuple]) -> str:
    """Markdown: each row (measurement, value, target, ok, wall-clock value or None)."""
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'measurement':<{width}} | {'value':>7} | {'wall-clock':>10} | {'target':<12} | status |",
             f"|{'-' * (width + 2)}|{'-' * 9}|{'-' * 12}|{'-' * 14}|--------|"]
    for name, value, target, ok, wall in rows:
        w = f"{wall:10.2f}" if wall is not None else f"{'':>10}"
        status = ('ok' if ok else 'MISSED') if target != '(context)' else ''
        lines.append(f"| {name:<{width}} | {value:7.2f} | {w} | {target:<12} | {status:<6} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the short run (a few minutes)")
    ap.add_argument("--repeats", type=int, default=3, help="paired repeats per ratio (default 3)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default 1, or $BENCH_THREADS; see common.py for why)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "scaling", "hf", "overhead", "profile"],
                    help="benchmarks to leave out")
    a = ap.parse_args()
    set_threads(a.threads)
    t0 = time.perf_counter()
    start = machine()
    log(f"machine: {start['cpu']}, {start['cores']} cores, torch {start['torch']} ({start['torch_threads']} threads), "
        f"load average {start['loadavg'][0]:.2f}")
    for name in ("demo", "100m"):
        log(f"model {describe_model(name)}")
    rows: list[tuple] = []
    timings = {}
    if "throughput" not in a.skip:
        log("throughput (paged vs naive):")
        t = time.perf_counter()
        rows += throughput.summary_rows(throughput.run(a.quick, a.repeats))
        timings["throughput_s"] = time.perf_counter() - t
    if not a.quick and "scaling" not in a.skip:
        import batch_scaling

        log("decode throughput vs batch:")
        t = time.perf_counter()
        sc = batch_scaling.run(quick=False)
        timings["scaling_s"] = time.perf_counter() - t
        for name, m in sc["models"].items():
            for label, d in m["dtypes"].items():
                for b in (28, 97):
                    rows.append((f"ceiling on this CPU: {name} {label} decode tok/s at batch {b} / batch 6 "
                                 "(uniform contexts)", d[f"ceiling_{b}_vs_6"], "(context)", True, None))
    if "hf" not in a.skip:
        log("Hugging Face transformers:")
        t = time.perf_counter()
        rows += hf_compare.summary_rows(hf_compare.run(a.quick, a.repeats))
        timings["hf_s"] = time.perf_counter() - t
    if "overhead" not in a.skip:
        log("cache manager + scheduler overhead:")
        t = time.perf_counter()
        rows += overhead.summary_rows(overhead.run(a.quick))
        timings["overhead_s"] = time.perf_counter() - t
    if not a.quick and "profile" not in a.skip:
        import profile_decode

        log("decode hot-path profile (100M preset):")
        t = time.perf_counter()
        profile_decode.run(quick=False)
        timings["profile_s"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    suffix = "_quick" if a.quick else ""
    text = table(rows) if rows else "(nothing run)"
    end = machine()
    note = (f"{'quick' if a.quick else 'full'} run, {total:.0f} s; ratios of output tokens per CPU-second "
            f"(wall-clock ratios beside them), median of {a.repeats} paired repeats; "
            f"load average {start['loadavg'][0]:.2f} at start, {end['loadavg'][0]:.2f} at end "
            f"(2 shared CPU cores: other work on the machine slows runs unevenly)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"summary{suffix}.md").write_text(text + "\n\n" + note + "\n")
    save_json(f"summary{suffix}", {"rows": [{"measurement": n, "value": v, "wall_clock_value": w, "target": t, "ok": ok}
                                            for n, v, t, ok, w in rows], "seconds": total, **timings,
                                   "loadavg_start": start["loadavg"], "loadavg_end": end["loadavg"]})
    print(text)
    print(note)


if __name__ == "__main__":
    main()

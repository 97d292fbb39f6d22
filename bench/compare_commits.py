"""Before/after of a speed change: two git revisions measured side by side.

Per revision: the dry-run decode step (scheduler, allocator and bookkeeping; no forward) and
`prepare_step` at batch 16 to 512, and the full decode step (128-token prompts) of the 100M
preset at batch 28 and 97 and of the demo at batch 32 and 256, in float32 and bfloat16, with
the part of those steps that is neither forward pass nor sampling (`in_step_us_*`, the overhead
target's measure). Each revision is checked out into a temporary
worktree and measured by its own bench/overhead.py in its own processes, alternating (A B,
B A, ...) so drifts in machine load hit both alike.

    python bench/compare_commits.py BEFORE [AFTER]    # AFTER defaults to the working tree
    python bench/compare_commits.py 1a45c43 --models 100m --batches 1 16 97   # issue 22's proof

Results go to bench/results/<dtype>/compare_commits_BEFORE.json (`--name` to change it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, log, save_json, worktree  # noqa: E402

BATCHES = (16, 64, 256, 512)
FULL_BATCHES = {"100m": (28, 97), "demo": (32, 256)}
DTYPES = ("float32", "bfloat16")
# Runs inside the measured tree, against its own package, through calls every revision has.
PROBE_OVERHEAD = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/bench']; "
                  "from overhead import TINY, dry_step_us, prepare_step_us; "
                  f"print(json.dumps({{'dry': {{b: dry_step_us('paged', b, 128, 3) for b in {BATCHES}}}, "
                  f"'prepare': {{b: prepare_step_us(TINY, 'paged', b, 48, 3)[0] for b in {BATCHES}}}}}))")
PROBE_FULL = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/bench']; "
              "from common import MODELS, load_model; from overhead import full_step_ms; "
              "name, batches = sys.argv[2], json.loads(sys.argv[3]); "
              "m = load_model(name); full_step_ms(m, MODELS[name], 4, 16, 2, 1); "
              "r = {b: full_step_ms(m, MODELS[name], b, 128, 4, 2) for b in batches}; "
              "print(json.dumps([{b: x['median_ms'] for b, x in r.items()}, "
              "{b: x.get('in_step_overhead_us') for b, x in r.items()}]))")


def probe(tree: Path, code: str, dtype: str = "float32", *args: str) -> dict:
    env = {**os.environ, "BENCH_DTYPE": dtype}
    out = subprocess.run([sys.executable, "-c", code, str(tree), *args], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(tree: Path, models: list[str], batches: dict[str, tuple[int, ...]], dtypes: list[str]) -> dict:
    doc = probe(tree, PROBE_OVERHEAD)
    for model in models:
        prefix = "full_ms" if model == "100m" else f"full_ms_{model}"  # the 100M keys as in earlier results
        for dt in dtypes:
            ms, in_step = probe(tree, PROBE_FULL, dt, model, json.dumps(batches[model]))
            doc[f"{prefix}_{dt}"] = ms
            if None not in in_step.values():  # revisions before the in-step measure lack it
                doc[f"in_step_us_{model}_{dt}"] = in_step
    return {k: {int(b): v for b, v in d.items()} for k, d in doc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", help="git revision before the change")
    ap.add_argument("after", nargs="?", default=None, help="git revision after it (default: the working tree)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="+", choices=list(FULL_BATCHES), default=list(FULL_BATCHES),
                    help="models whose full decode steps to time (default: all)")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="batch sizes of the full decode steps (default: per model, as FULL_BATCHES)")
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    ap.add_argument("--name", default=None, help="results file name (default: compare_commits_BEFORE)")
    a = ap.parse_args()
    batches = {m: tuple(a.batches) if a.batches else FULL_BATCHES[m] for m in a.models}
    with ExitStack() as stack:
        trees = {"before": stack.enter_context(worktree(a.before)),
                 "after": ROOT if a.after is None else stack.enter_context(worktree(a.after))}
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for r in range(a.repeats):
            for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                runs[name].append(measure(trees[name], a.models, batches, a.dtypes))
                log(f"  repeat {r + 1} {name}: {runs[name][-1]}")
    med = {name: {key: {b: statistics.median(r[key][b] for r in rs) for b in rs[0][key]} for key in rs[0]}
           for name, rs in runs.items()}
    save_json(a.name or f"compare_commits_{a.before}", {"before": a.before, "after": a.after or "working tree", "runs": runs, "median": med})
    print(f"{'measurement':<34} {'batch':>6} {'before':>9} {'after':>9} {'after/before':>13}")
    for key in med["before"]:
        unit = "ms" if key.startswith("full") else "us"
        for b, before in med["before"][key].items():
            if key not in med["after"]:
                continue
            after = med["after"][key][b]
            print(f"{key + ' (' + unit + ')':<34} {b:>6} {before:9.1f} {after:9.1f} {after / before:13.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The twins' --json output on the demo, for a fixed set of runs: recorded once, compared after a change.

A refactor that changes no behaviour must leave every figure, token and timeline entry of these
runs as it was; only wall-clock fields differ from run to run and are dropped. The runs cover
both twins at a few batch sizes, preemption by recompute and by swap, parallel sampling, beam
search, prefix caching, streamed --output, and the dry runs (--simulate, --find-max-batch).

    python tools/check_twin_json.py            # compare against tests/data/twin_json_baseline.json
    python tools/check_twin_json.py --record   # (re)write that baseline from the working tree

Exit status 0 when every run matches, 1 (naming the first differing field of each run) otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "tests" / "data" / "twin_json_baseline.json"
WALL_CLOCK = {"elapsed_s", "output_tokens_per_s"}  # the only fields that may differ between runs
# Keys added since the baseline was recorded, which it cannot hold: issue 26's four-way breakdown.
NEW_KEYS = {"waste"}
SYSTEM = ["--system-prompt", "You are a helpful assistant who answers briefly and precisely."]

# name -> (twin, arguments); every run is on the demo model, CPU, one thread, no progress bar.
RUNS: dict[str, tuple[str, list[str]]] = {
    "naive-1": ("naive", ["1", "--max-new-tokens", "40"]),
    "naive-4": ("naive", ["4", "--max-new-tokens", "32"]),
    "paged-1": ("paged", ["1", "--max-new-tokens", "40"]),
    "paged-4": ("paged", ["4", "--max-new-tokens", "32"]),
    "paged-12-block8": ("paged", ["12", "--max-new-tokens", "24", "--block-size", "8"]),
    "paged-preempt-recompute": ("paged", ["6", "--num-blocks", "130", "--max-new-tokens", "64"]),
    "paged-preempt-swap": ("paged", ["6", "--num-blocks", "130", "--max-new-tokens", "64", "--preemption", "swap"]),
    "paged-preempt-swap-full": ("paged", ["6", "--num-blocks", "130", "--max-new-tokens", "64", "--preemption",
                                          "swap", "--swap-space-gb", "0.001"]),
    "naive-n2-sampled": ("naive", ["2", "--n", "2", "--temperature", "0.8", "--top-p", "0.9",
                                   "--max-new-tokens", "20"]),
    "paged-n3-sampled": ("paged", ["3", "--n", "3", "--temperature", "0.8", "--top-p", "0.9",
                                   "--max-new-tokens", "24", "--seed", "7"]),
    "paged-n3-preempt-swap": ("paged", ["3", "--n", "3", "--temperature", "1.0", "--num-blocks", "116",
                                        "--max-new-tokens", "40", "--preemption", "swap"]),
    "naive-beam2": ("naive", ["2", "--beam-width", "2", "--max-new-tokens", "12"]),
    "paged-beam3": ("paged", ["2", "--beam-width", "3", "--max-new-tokens", "16"]),
    "paged-beam2-preempt": ("paged", ["3", "--beam-width", "2", "--num-blocks", "116", "--max-new-tokens", "40"]),
    "paged-prefix": ("paged", ["5", "--enable-prefix-caching", *SYSTEM, "--max-new-tokens", "16"]),
    "paged-prefix-preempt-swap": ("paged", ["6", "--enable-prefix-caching", *SYSTEM, "--num-blocks", "130",
                                            "--max-new-tokens", "64", "--preemption", "swap"]),
    "naive-system": ("naive", ["3", *SYSTEM, "--max-new-tokens", "16"]),
    "paged-output-stream": ("paged", ["3", "--max-new-tokens", "16", "--output", "{output}"]),
    "naive-simulate-8b": ("naive", ["6", "--simulate", "llama3-8b", "--gpu-memory-gb", "24"]),
    "paged-simulate-8b": ("paged", ["40", "--simulate", "llama3-8b", "--gpu-memory-gb", "24"]),
    "paged-simulate-70b-tp": ("paged", ["24", "--simulate", "llama3-70b", "--gpu-memory-gb", "80",
                                        "--tensor-parallel-size", "4"]),
    "naive-find-max-batch": ("naive", ["--find-max-batch"]),
    "paged-find-max-batch": ("paged", ["8", "--find-max-batch", "--kv-cache-gb", "0.02"]),
    "naive-too-large": ("naive", ["16", "--kv-cache-gb", "0.05"]),
}


def run(twin: str, args: list[str]) -> dict:
    """One run's exit status, error line and --json document (wall-clock fields dropped)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, js = Path(tmp) / "out.jsonl", Path(tmp) / "run.json"
        argv = [a.replace("{output}", str(out)) for a in args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, str(ROOT / f"llama3-{twin}.py"), *argv, "--json", str(js),
                            "--threads", "1", "--no-progress"], capture_output=True, text=True, env=env, cwd=ROOT)
        doc = json.loads(js.read_text()) if js.exists() else None
        if doc is not None:
            for key in WALL_CLOCK | NEW_KEYS:
                doc.pop(key, None)
        stream = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else None
    return {"returncode": p.returncode, "stderr": p.stderr.strip().splitlines()[-1:] if p.returncode else [],
            "json": doc, "output": stream}


def dumps(runs: dict) -> str:
    """One run per line: compact, and a diff still names the runs that changed."""
    lines = [f"{json.dumps(name)}: {json.dumps(doc, ensure_ascii=False, separators=(',', ':'))}"
             for name, doc in runs.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def first_difference(a, b, path: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{path or '.'}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}.{key}: only in the {'baseline' if key in a else 'new run'}"
            d = first_difference(a[key], b[key], f"{path}.{key}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} entries != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path or '.'}: {a!r} != {b!r}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help=f"write the baseline ({BASELINE.relative_to(ROOT)})")
    ap.add_argument("--only", nargs="+", choices=list(RUNS), help="just these runs")
    a = ap.parse_args()
    names = a.only or list(RUNS)
    results = {}
    for name in names:
        results[name] = run(*RUNS[name])
        print(f"{name}: exit {results[name]['returncode']}", file=sys.stderr)
    if a.record:
        recorded = json.loads(BASELINE.read_text()) if a.only and BASELINE.exists() else {}
        recorded.update(results)  # --only re-records just those runs
        BASELINE.parent.mkdir(parents=True, exist_ok=True)
        BASELINE.write_text(dumps(recorded))
        print(f"recorded {len(results)} runs in {BASELINE.relative_to(ROOT)}")
        return 0
    baseline = json.loads(BASELINE.read_text())
    bad = 0
    for name in names:
        d = first_difference(baseline[name], results[name])
        print(f"{name}: {'identical' if d is None else 'DIFFERS at ' + d}")
        bad += d is not None
    print(f"{len(names) - bad} of {len(names)} runs identical to the baseline")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

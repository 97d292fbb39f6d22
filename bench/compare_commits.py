"""Before/after of a change to the scheduler or cache manager: the dry-run decode step (scheduler,
allocator and bookkeeping; no forward) of two git revisions, measured side by side.

Each revision is checked out into a temporary worktree and measured in its own process, the
processes alternating (A B, B A, ...) so drifts in machine load hit both alike.

    python bench/compare_commits.py BEFORE [AFTER]    # AFTER defaults to the working tree
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, log, save_json  # noqa: E402

BATCHES = (16, 64, 256, 512)
# Runs inside the measured tree: its own bench/overhead.py against its own package.
PROBE = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/bench']; "
         "from overhead import dry_step_us; "
         f"print(json.dumps({{b: dry_step_us('paged', b, 128, 3) for b in {BATCHES}}}))")


def measure(tree: Path) -> dict[int, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(tree)], capture_output=True, text=True, check=True)
    return {int(b): us for b, us in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", help="git revision before the change")
    ap.add_argument("after", nargs="?", default=None, help="git revision after it (default: the working tree)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for name, rev in (("before", a.before), ("after", a.after)):
            if rev is None:
                trees[name] = ROOT
                continue
            trees[name] = Path(tmp) / name
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(trees[name]), rev], check=True)
        try:
            runs: dict[str, list[dict[int, float]]] = {"before": [], "after": []}
            for r in range(a.repeats):
                for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    runs[name].append(measure(trees[name]))
                    log(f"  repeat {r + 1} {name}: " + ", ".join(f"B={b} {us:.0f} us" for b, us in runs[name][-1].items()))
        finally:
            for name, tree in trees.items():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    med = {name: {b: statistics.median(r[b] for r in rs) for b in BATCHES} for name, rs in runs.items()}
    save_json("compare_commits", {"before": a.before, "after": a.after or "working tree", "batches": BATCHES,
                                  "dry_step_us": runs, "median_us": med})
    print(f"{'batch':>6} {'before us':>10} {'after us':>10} {'after/before':>13}")
    for b in BATCHES:
        print(f"{b:>6} {med['before'][b]:10.0f} {med['after'][b]:10.0f} {med['after'][b] / med['before'][b]:13.2f}")


if __name__ == "__main__":
    main()

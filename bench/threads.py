"""`llama3-paged.py 4` with 1 thread, 2 threads and the default, on an idle machine and with one core
kept busy by another process: what the `--threads` default is for (pagedllama/threads.py).

    python bench/threads.py [--repeats 3]

Each repeat waits (up to 25 min) for a second in which the machine's cores are idle, runs the
three settings, then starts a busy loop on one core and runs them again. Prints one line per
phase: wall seconds of the run (the report's "generated in") and the threads it used.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pagedllama.app.threads import idle_cores  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the default must choose


def run(threads: int | None) -> tuple[float, int]:
    argv = [sys.executable, str(ROOT / "llama3-paged.py"), "4", "--no-progress"]
    out = subprocess.run(argv + (["--threads", str(threads)] if threads else []), capture_output=True, text=True,
                         env=ENV, check=True).stdout
    return float(re.search(r"generated in ([\d.]+) s", out)[1]), int(re.search(r"threads: (\d+)", out)[1])


def wait_idle(limit_s: float) -> float | None:
    end = time.time() + limit_s
    while time.time() < end:
        idle = idle_cores(1.0)
        if idle is not None and idle >= len(os.sched_getaffinity(0)) - 0.1:
            return idle
        time.sleep(5)
    return None


def phase(label: str) -> None:
    results = {name: run(t) for name, t in (("1 thread", 1), ("2 threads", 2), ("default", None))}
    print(f"{label}: " + ", ".join(f"{name} {s:.1f} s" + (f" (chose {n})" if name == "default" else "")
                                   for name, (s, n) in results.items()) + f"; idle after: {idle_cores(0.5):.2f}",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    for _ in range(args.repeats):
        if wait_idle(1500) is None:
            sys.exit("no idle second in 25 minutes: other processes keep the machine busy")
        phase("idle")
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1)
            phase("one core busy")
        finally:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()

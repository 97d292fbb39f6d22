"""Before/after of the decode step's bookkeeping, two revisions stepped in lockstep in one process.

`compare_commits.py` measures each revision in its own processes, and on this machine the
drift between processes (tens of percent) swamps a change of a few hundred microseconds.
Here a revision's `pagedllama` is imported from a git worktree under another name, beside the
working tree's, and two engines with identical requests take turns step by step. Their
forward pass is a stub that evicts the CPU caches as a real one does (it rewrites a 24 MB
tensor), because the bookkeeping runs between forward passes, its data no longer cached. Each
step's time less the stub forward and sampling (`Engine._next_tokens`) is the bookkeeping:
scheduler, cache manager, `prepare_step`, stop checks and records.

    python bench/bookkeeping_ab.py BEFORE [--batch 256] [--steps 60] [--repeats 3]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, save_json, set_threads, worktree  # noqa: E402
from overhead import MAX_SEQ_LEN, TINY, requests  # noqa: E402

EVICT = torch.zeros(6_000_000)  # 24 MB, more than this CPU's L2 and its share of L3


def import_package(name: str, tree: Path | None = None) -> ModuleType:
    """The working tree's pagedllama, or `tree`'s imported as `name` beside it."""
    if tree is None:
        package = importlib.import_module(name)
    else:
        spec = importlib.util.spec_from_file_location(name, tree / "pagedllama" / "__init__.py",
                                                      submodule_search_locations=[str(tree / "pagedllama")])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    for sub in ("attention", "budget", "engine", "sampling"):
        importlib.import_module(f"{name}.{sub}")
    return package


class EvictingStub:
    """A forward pass that costs nothing but evicts the caches; its own time is tallied to be left out."""

    def __init__(self, vocab: int, spent: list[float]):
        self.logits = torch.randn(1024, vocab, generator=torch.Generator().manual_seed(0))
        self.spent = spent

    def __call__(self, tokens, positions, cache, meta):
        t0 = time.perf_counter()
        EVICT.add_(1.0)
        self.spent[0] += time.perf_counter() - t0
        return self.logits[:len(meta.logits_indices)]


def engine(pkg: ModuleType, reqs: list, spent: list[float]):
    """A paged engine of `pkg` holding the whole batch, admitted and prefilled, its sampling timed."""
    num_blocks = sum(-(-(len(r.prompt_ids) + r.max_new_tokens) // 16) for r in reqs) + 1
    cache = pkg.budget.build_cache("paged", TINY, reqs, 0, MAX_SEQ_LEN, pkg.attention.TorchAttention(),
                                   torch.device("cpu"), torch.float32, block_size=16, num_blocks=num_blocks)
    eng = pkg.engine.Engine(EvictingStub(TINY.vocab_size, spent), cache, pkg.sampling.SamplingParams(), frozenset(),
                            ignore_eos=True, max_prefill_tokens=4096)
    next_tokens = eng._next_tokens

    def timed_next_tokens(*args):
        t0 = time.perf_counter()
        out = next_tokens(*args)
        spent[0] += time.perf_counter() - t0
        return out

    eng._next_tokens = timed_next_tokens
    eng.add([pkg.engine.Request(r.request_id, r.prompt_ids, r.max_new_tokens) for r in reqs])
    while len(eng.scheduler.running) < len(reqs) or eng.scheduler.waiting:
        eng.step()
    return eng


def lockstep(pkgs: dict[str, ModuleType], batch: int, steps: int, seed: int) -> dict[str, list[float]]:
    """Bookkeeping time of each decode step (s), the revisions taking turns, the order alternating."""
    reqs = requests(batch, 64, steps + 2, seed=seed)
    spent = [0.0]
    engines = {name: engine(pkg, reqs, spent) for name, pkg in pkgs.items()}
    times: dict[str, list[float]] = {name: [] for name in pkgs}
    order = list(engines)
    for i in range(steps):
        for name in order if i % 2 == 0 else order[::-1]:
            EVICT.add_(1.0)
            spent[0] = 0.0
            t0 = time.perf_counter()
            engines[name].step()
            times[name].append(time.perf_counter() - t0 - spent[0])
    outputs = [[s.token_ids for s in e.scheduler.running] for e in engines.values()]
    assert all(o == outputs[0] for o in outputs), "the revisions generated different tokens"
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", help="git revision before the change (the working tree is after)")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    set_threads(1)
    with worktree(a.before) as tree:
        pkgs = {"before": import_package("pagedllama_before", tree), "after": import_package("pagedllama")}
        doc: dict = {"before": a.before, "after": "working tree", "batches": a.batch, "repeats": []}
        for rep in range(a.repeats):
            doc["repeats"].append({b: lockstep(pkgs, b, a.steps, seed=rep) for b in a.batch})
            log(f"  repeat {rep + 1}: " + ", ".join(
                f"B={b} " + " ".join(f"{n} {1e6 * statistics.median(t):.0f}us" for n, t in r.items())
                for b, r in doc["repeats"][-1].items()))
    doc["median_us"] = {b: {n: 1e6 * statistics.median(statistics.median(r[b][n]) for r in doc["repeats"])
                            for n in pkgs} for b in a.batch}
    doc["ratios"] = {b: [statistics.median(r[b]["after"]) / statistics.median(r[b]["before"]) for r in doc["repeats"]]
                     for b in a.batch}
    save_json(f"bookkeeping_ab_{a.before}", doc)
    print(f"{'batch':>6} {'before us':>10} {'after us':>10} {'after / before (per repeat)':>30}")
    for b in a.batch:
        m, r = doc["median_us"][b], doc["ratios"][b]
        print(f"{b:>6} {m['before']:10.0f} {m['after']:10.0f}   {statistics.median(r):.2f} "
              f"({', '.join(f'{x:.2f}' for x in r)})")


if __name__ == "__main__":
    main()

"""Output tokens per second of the paged twin over the naive twin, real forward passes.

1. Same batch size: both twins run the same B requests with a KV budget of exactly B naive rows
   (so the naive twin fits and the paged pool never runs short). This prices the block-table
   indirection: the target is paged / naive >= 0.95.
2. Same KV budget (the CLI's CPU default: 6.19 rows of max_seq_len, as Llama 3 8B has on a
   24 GB GPU), each twin at its largest batch. naive's largest is budget // row; paged's is found
   by the dry run (largest K whose first K requests fit: none waits for blocks, none preempted). Both serve
   the same K_paged requests: paged as one batch, naive as consecutive batches of its largest size
   (it cannot hold more). Target >= 4. Also reported: each twin's single largest batch (naive's
   first batch alone, as one llama3-naive.py run) and, in the full mode, naive rows with continuous
   batching, which isolates the memory layout from the batching policy.

The runs compared are interleaved step by step (`common.lockstep`): one step of each in turn,
each step timed, so the machine's slow drifts hit them alike; repeated, the order reversed
each time, and each ratio the median of the per-repeat ratios.

    python bench/throughput.py [--quick] [--repeats N] [--only same_budget] [--models 100m]
    BENCH_ATTENTION=flex python bench/throughput.py ...   # every run through that attention backend
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (MAX_SEQ_LEN, RandomSpec, budget_for_rows, default_budget, describe_model,  # noqa: E402
                    engine_steps, load_model, lockstep_repeats, log, make_cache, median, naive_continuous_cache,
                    naive_max_batch, naive_waves, paged_max_batch, random_requests, ratios, save_json,
                    bench_parser, parse, print_summary, sharegpt_requests, workload_stats)

RANDOM_CTX = 1024  # nano-vllm: lengths up to 1024 + 1024 in a 4096 context; here 256 + 256 in 1024


def count_equal(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b))


def same_batch(model_name: str, reqs, label: str, repeats: int, max_seq_len: int = MAX_SEQ_LEN) -> dict:
    model = load_model(model_name)
    budget = budget_for_rows(model_name, len(reqs), max_seq_len)
    log(f"  same batch: {model_name}, {label}, batch {len(reqs)}, budget {budget / 2**20:.0f} MiB")
    def run(twin):
        return lambda: engine_steps(model, make_cache(twin, model_name, reqs, budget, max_seq_len), reqs)

    tps, rounds = lockstep_repeats({twin: run(twin) for twin in ("naive", "paged")}, repeats, log)
    for stats in rounds:
        for twin, r in stats.items():
            assert r.preemptions == 0 and r.peak_running == len(reqs), (twin, r.preemptions, r.peak_running)
    outs = {twin: r.outputs for twin, r in rounds[-1].items()}
    return {"kind": "same_batch", "model": model_name, "workload": label, "batch": len(reqs),
            "max_seq_len": max_seq_len, "budget_bytes": budget, "workload_stats": workload_stats(reqs),
            "tok_per_s": tps, "naive_tok_per_cpu_s": median(tps["naive"]["cpu"]),
            "paged_tok_per_cpu_s": median(tps["paged"]["cpu"]), "ratio": ratios(tps, "paged", "naive"),
            "target": 0.95, "identical_outputs": count_equal(outs["naive"], outs["paged"]), "repeats": repeats}


def same_budget(model_name: str, reqs, label: str, repeats: int, max_seq_len: int = MAX_SEQ_LEN,
                continuous: bool = False, backend_cls=None) -> dict:
    """`reqs`: the pool the dry run draws its largest batch from (in order). `backend_cls`: an
    attention backend class to use instead of the package's torch backend (what-if runs)."""
    model = load_model(model_name)
    budget = default_budget(model_name, max_seq_len)
    k_naive = naive_max_batch(model_name, budget, max_seq_len)
    k_paged, exhausted = paged_max_batch(model_name, reqs, budget, max_seq_len)
    work = reqs[:k_paged]
    log(f"  same budget: {model_name}, {label}, budget {budget / 2**20:.1f} MiB: naive batch {k_naive}, "
        f"paged batch {k_paged}{' (all requests fit)' if exhausted else ''}")
    runs = {"naive_waves": lambda: naive_waves(model, model_name, work, k_naive, budget, max_seq_len, backend_cls),
            "paged": lambda: engine_steps(model, make_cache("paged", model_name, work, budget, max_seq_len,
                                                            backend=backend_cls() if backend_cls else None), work)}
    if continuous:
        runs["naive_continuous"] = lambda: engine_steps(
            model, naive_continuous_cache(model_name, k_naive, len(work), max_seq_len), work)
    tps, rounds = lockstep_repeats(runs, repeats, log)
    for stats in rounds:
        r = stats["paged"]
        assert r.preemptions == 0 and r.peak_running == k_paged, (r.preemptions, r.peak_running)
    first_wave = {k: [stats["naive_waves"].parts[0].rates()[k] for stats in rounds] for k in ("cpu", "wall")}
    outs = {name: r.outputs for name, r in rounds[-1].items()}
    doc = {"kind": "same_budget", "model": model_name, "workload": label, "max_seq_len": max_seq_len,
           "budget_bytes": budget, "naive_batch": k_naive, "paged_batch": k_paged, "pool_exhausted": exhausted,
           "batch_ratio": k_paged / k_naive, "workload_stats": workload_stats(work),
           "naive_waves": -(-k_paged // k_naive), "tok_per_s": tps, "naive_single_batch_tok_per_s": first_wave,
           "ratio": ratios(tps, "paged", "naive_waves"),
           "ratio_single_batch": ratios({**tps, "naive_single": first_wave}, "paged", "naive_single"),
           "target": 4.0, "identical_outputs": count_equal(outs["naive_waves"], outs["paged"]), "repeats": repeats}
    if continuous:
        doc["ratio_vs_naive_continuous"] = ratios(tps, "paged", "naive_continuous")
    return doc


def plan(quick: bool) -> tuple[list, list]:
    """(same-batch cases, same-budget cases): (model, requests, label, max_seq_len, naive-continuous too?)."""
    rnd = RandomSpec(256, 25, 256, 25, 256)
    if quick:
        rnd32 = RandomSpec(32, 25, 256, 25, 128)
        # 100m steps are few and long: answers of 16-48 tokens keep its paired ratio out of the noise
        # (with 8-16 its repeats spread 0.79-1.10 here)
        rnd_small = RandomSpec(16, 16, 64, 16, 48)
        rnd_budget = RandomSpec(256, 25, 256, 25, 128)
        batch = [("demo", sharegpt_requests(16, cap=128), "ShareGPT first 16, answers capped at 128", MAX_SEQ_LEN),
                 ("demo", random_requests(rnd32), rnd32.label(), RANDOM_CTX),
                 ("100m", random_requests(rnd_small), rnd_small.label(), RANDOM_CTX)]
        budget = [("demo", sharegpt_requests(cap=64), "ShareGPT, answers capped at 64", MAX_SEQ_LEN, False),
                  ("demo", random_requests(rnd_budget), rnd_budget.label(), RANDOM_CTX, False)]
        return batch, budget
    rnd_100m = RandomSpec(256, 25, 256, 25, 64)
    batch = [("demo", sharegpt_requests(32), "ShareGPT first 32, reference answer lengths", MAX_SEQ_LEN),
             ("demo", random_requests(rnd)[:64], f"first 64 of {rnd.label()}", RANDOM_CTX),
             ("100m", sharegpt_requests(16, cap=64), "ShareGPT first 16, answers capped at 64", MAX_SEQ_LEN),
             ("100m", random_requests(rnd_100m)[:16], f"first 16 of {rnd_100m.label()}", RANDOM_CTX)]
    budget = [("demo", sharegpt_requests(cap=256), "ShareGPT, answers capped at 256", MAX_SEQ_LEN, True),
              ("demo", random_requests(rnd), rnd.label(), RANDOM_CTX, True),
              ("100m", sharegpt_requests(cap=32), "ShareGPT, answers capped at 32", MAX_SEQ_LEN, False),
              ("100m", random_requests(rnd_100m), rnd_100m.label(), RANDOM_CTX, True)]
    return batch, budget


def run(quick: bool, repeats: int = 3, only: str | None = None, models: list[str] | None = None) -> dict:
    """`only`: same_batch or same_budget; `models`: those models' cases alone (partial runs save to
    their own file, named after them and BENCH_ATTENTION if set)."""
    batch_cases, budget_cases = plan(quick)
    batch_cases = [c for c in batch_cases if only != "same_budget" and (not models or c[0] in models)]
    budget_cases = [c for c in budget_cases if only != "same_batch" and (not models or c[0] in models)]
    attention = os.environ.get("BENCH_ATTENTION")
    results = {"quick": quick, "models": {m: describe_model(m) for m in ("demo", "100m")},
               "attention": attention or "auto", "same_batch": [], "same_budget": []}
    for model, reqs, label, ctx in batch_cases:
        results["same_batch"].append(same_batch(model, reqs, label, repeats, ctx))
    for model, reqs, label, ctx, continuous in budget_cases:
        results["same_budget"].append(same_budget(model, reqs, label, repeats, ctx, continuous=continuous))
    name = "throughput" + ("_quick" if quick else "")
    if only or models or attention:
        name += "".join(f"_{part}" for part in [only, *(models or []), attention] if part)
    results["name"] = name
    save_json(name, results)
    plot(results)
    return results


def plot(results: dict) -> None:
    from common import pyplot, save_plot

    plt = pyplot()
    rows = [(f"same batch\n{r['model']} B={r['batch']}\n{r['workload'].split(',')[0]}", r) for r in results["same_batch"]]
    rows += [(f"same budget\n{r['model']} {r['naive_batch']} vs {r['paged_batch']}\n{r['workload'].split(',')[0]}", r)
             for r in results["same_budget"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.2))
    xs = range(len(rows))
    vals = [r["ratio"]["median"] for _, r in rows]
    lo = [v - r["ratio"]["min"] for v, (_, r) in zip(vals, rows)]
    hi = [r["ratio"]["max"] - v for v, (_, r) in zip(vals, rows)]
    colors = ["tab:blue" if r["kind"] == "same_batch" else "tab:green" for _, r in rows]
    ax.bar(xs, vals, yerr=[lo, hi], color=colors, capsize=4)
    for x, (_, r), v in zip(xs, rows, vals):
        ax.hlines(r["target"], x - 0.4, x + 0.4, colors="red", linestyles="dashed")
        ax.text(x, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [n for n, _ in rows], fontsize=7)
    ax.set_ylabel("paged / naive output tokens per CPU-second")
    ax.set_title("paged over naive (median of paired repeats; bars: min-max; red: target)", fontsize=9)
    save_plot(fig, results.get("name", "throughput" + ("_quick" if results["quick"] else "")))


def summary_rows(results: dict) -> list[tuple]:
    rows = []
    for r in results["same_batch"]:
        rows.append((f"paged / naive, same batch {r['batch']} ({r['model']}, {r['workload'].split(',')[0]})",
                     r["ratio"]["median"], ">= 0.95", r["ratio"]["median"] >= 0.95, r["ratio"]["wall"]["median"]))
    for r in results["same_budget"]:
        name = f"{r['model']}, {r['workload'].split(',')[0]}, batch {r['paged_batch']} vs {r['naive_batch']}"
        rows.append((f"paged / naive, same KV budget ({name})", r["ratio"]["median"], ">= 4",
                     r["ratio"]["median"] >= 4, r["ratio"]["wall"]["median"]))
    return rows


def main() -> None:
    ap = bench_parser(__doc__, repeats=True)
    ap.add_argument("--only", choices=["same_batch", "same_budget"])
    ap.add_argument("--models", nargs="+", choices=["demo", "100m"])
    a = parse(ap)
    print_summary(summary_rows(run(a.quick, a.repeats, a.only, a.models)))


if __name__ == "__main__":
    main()

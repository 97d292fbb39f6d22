"""Where a decode step's time goes: 100M preset, batch 16 and 64, both twins.

For each (twin, batch), one engine run over the first B ShareGPT prompts (their real, uneven
lengths) and over B uniform random prompts of the same mean length, then, after 2 warm decode steps:
- 4 decode steps under torch.profiler: top ops by self CPU time;
- 4 decode steps timed by wrappers on the instance: whole step, `ModelRunner.prepare`, and the
  attention backend (`cache.attend`, all layers: K/V write, gather, SDPA);
- before/after: decode steps (CPU time) rotating the cache's attention backend step by step between
  the package's torch backend and the ones it replaced (baselines.py; same run, same contexts).
- before/after for prefill: the batch's prompts prefilled (one output token each) with each
  backend, interleaved, median of 3.
And (unless --skip-same-budget) the same-KV-budget ShareGPT throughput (prefill included) with
the package's backend and the split-K one it replaced, in both twins.

    python bench/profile_decode.py [--quick] [--skip-same-budget]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (save_plot, Request, budget_for_rows, run_engine, describe_model, load_model, log,  # noqa: E402
                    make_cache, pyplot, random_requests, RandomSpec, save_json, bench_parser, parse, sharegpt_requests)
from baselines import PaddedTorchAttention, PerHeadGqaTorchAttention, SplitKTorchAttention  # noqa: E402

from pagedllama.model.attention import TorchAttention  # noqa: E402

WARM, PROFILED, TIMED, WHATIF_ROUNDS = 2, 4, 4, 4
BACKENDS = {"package": TorchAttention, "before: a query row per head": PerHeadGqaTorchAttention,
            "before: split-K": SplitKTorchAttention, "first: one padded batch": PaddedTorchAttention}


def profile_case(model_name: str, twin: str, reqs: list[Request], top: int = 12) -> dict:
    model = load_model(model_name)
    decode_steps = WARM + PROFILED + TIMED + WHATIF_ROUNDS * len(BACKENDS)
    reqs = [Request(r.request_id, r.prompt_ids, decode_steps + 1) for r in reqs]
    cache = make_cache(twin, model_name, reqs, budget_for_rows(model_name, len(reqs)))
    engine = cache.engine(model, reqs)
    runner = engine.runner
    backends = {name: cls() for name, cls in BACKENDS.items()}
    state = {"decode": 0, "prefill": True, "attend": 0.0, "prepare": 0.0}
    timed = {"step": [], "prepare": [], "attend": []}
    whatif: dict[str, list[float]] = {name: [] for name in BACKENDS}
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    schedule, step, prepare, attend = engine.scheduler.schedule, engine.step, runner.prepare, runner.cache.attend

    def schedule_():
        batch, is_prefill = schedule()
        state["prefill"] = is_prefill
        return batch, is_prefill

    def prepare_(seqs, is_prefill, *a, **k):
        t0 = time.process_time()
        out = prepare(seqs, is_prefill, *a, **k)
        state["prepare"] += time.process_time() - t0
        return out

    def attend_(*a, **k):
        t0 = time.process_time()
        out = attend(*a, **k)
        state["attend"] += time.process_time() - t0
        return out

    def step_():
        i = state["decode"]  # decode steps done so far
        whatif_i = i - (WARM + PROFILED + TIMED)
        backend = None
        if whatif_i >= 0:
            backend = list(BACKENDS)[whatif_i % len(BACKENDS)]
            runner.cache.backend = backends[backend]
        if i == WARM and not state["prefill"]:
            prof.start()
        state["attend"] = state["prepare"] = 0.0
        t0 = time.process_time()
        out = step()
        dt = time.process_time() - t0
        if state["prefill"]:
            return out
        state["decode"] += 1
        if i == WARM + PROFILED - 1:
            prof.stop()
        elif WARM + PROFILED <= i < WARM + PROFILED + TIMED:
            timed["step"].append(dt)
            timed["prepare"].append(state["prepare"])
            timed["attend"].append(state["attend"])
        elif backend is not None:
            whatif[backend].append(dt)
        return out

    engine.scheduler.schedule, engine.step, runner.prepare, runner.cache.attend = schedule_, step_, prepare_, attend_
    engine.run(reqs, progress=False)

    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    lens = [len(r.prompt_ids) for r in reqs]
    step_ms = 1e3 * statistics.median(timed["step"])
    return {
        "twin": twin, "batch": len(reqs), "prompt_len_mean": statistics.mean(lens), "prompt_len_max": max(lens),
        "padding_efficiency": sum(lens) / (len(lens) * max(lens)),
        "profiled_steps": PROFILED,
        "top_ops": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / PROFILED,
                     "pct": 100 * e.self_cpu_time_total / total, "calls_per_step": e.count / PROFILED} for e in ops],
        "step_ms": step_ms,
        "prepare_ms": 1e3 * statistics.median(timed["prepare"]),
        "attend_ms": 1e3 * statistics.median(timed["attend"]),
        "attend_pct": 100 * statistics.median(timed["attend"]) / statistics.median(timed["step"]),
        "whatif_step_ms": {k: 1e3 * statistics.median(v) for k, v in whatif.items()},
    }


def prefill_ms(model_name: str, reqs: list[Request], repeats: int = 3) -> dict[str, float]:
    """Prefill time of the paged twin for `reqs` with each backend: requests of one output token."""
    model = load_model(model_name)
    reqs = [Request(r.request_id, r.prompt_ids, 1) for r in reqs]
    times: dict[str, list[float]] = {name: [] for name in BACKENDS}
    for rep in range(repeats):
        for name in (list(BACKENDS) if rep % 2 == 0 else list(BACKENDS)[::-1]):
            cache = make_cache("paged", model_name, reqs, budget_for_rows(model_name, len(reqs)),
                               backend=BACKENDS[name]())
            times[name].append(1e3 * run_engine(model, cache, reqs).cpu_seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def run(quick: bool = False, same_budget: bool = True) -> dict:
    model_name = "100m"
    doc: dict = {"model": describe_model(model_name), "cases": []}
    batches = [16] if quick else [16, 64]
    for b in batches:
        sg = sharegpt_requests(b)
        mean = round(statistics.mean(len(r.prompt_ids) for r in sg))
        uni = random_requests(RandomSpec(b, mean, mean, 1, 1, seed=1))
        pf = prefill_ms(model_name, sg)
        doc.setdefault("prefill_ms", []).append({"batch": b, "prompt_tokens": sum(len(r.prompt_ids) for r in sg), **pf})
        log(f"  prefill, batch {b} ShareGPT prompts: " + ", ".join(f"{k} {v:.0f} ms" for k, v in pf.items()))
        for label, reqs in (("ShareGPT prompts", sg), (f"uniform {mean}-token prompts", uni)):
            for twin in ("naive", "paged"):
                log(f"  profile: {model_name} {twin}, batch {b}, {label}")
                case = profile_case(model_name, twin, reqs)
                case["workload"] = label
                doc["cases"].append(case)
                log(f"    step {case['step_ms']:.1f} ms, attention {case['attend_ms']:.1f} ms "
                    f"({case['attend_pct']:.0f}%), prepare_step {case['prepare_ms']:.2f} ms; top: "
                    + ", ".join(f"{o['op']} {o['pct']:.0f}%" for o in case["top_ops"][:4]))
                log("    what-if step ms: " + ", ".join(f"{k} {v:.1f}" for k, v in case["whatif_step_ms"].items()))
    if not quick and same_budget:
        import throughput

        log("  before/after: same KV budget, ShareGPT (answers capped at 32), demo, in both twins")
        reqs = sharegpt_requests(cap=32)
        after = throughput.same_budget("demo", reqs, "ShareGPT, answers capped at 32", 3)
        before = throughput.same_budget("demo", reqs, "ShareGPT, answers capped at 32", 3,
                                        backend_cls=SplitKTorchAttention)
        doc["whatif_same_budget"] = {"after": after, "before": before}
        log(f"    paged/naive: after {after['ratio']['median']:.2f}, before {before['ratio']['median']:.2f}")
    save_json("profile_decode" + ("_quick" if quick else ""), doc)
    plot(doc, quick)
    return doc


def plot(doc: dict, quick: bool) -> None:
    plt = pyplot()
    cases = doc["cases"]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(cases)), 4.2))
    names = list(BACKENDS)
    width = 0.8 / len(names)
    for j, n in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(cases))]
        ax.bar(xs, [c["whatif_step_ms"][n] for c in cases], width, label=n)
    ax.set_xticks(range(len(cases)),
                  [f"{c['twin']} B={c['batch']}\n{c['workload'].split(' ')[0]}" for c in cases], fontsize=7)
    ax.set_ylabel("decode step (ms, median)")
    ax.set_title("100M preset decode step by attention implementation (same run, rotating per step)", fontsize=9)
    ax.legend(fontsize=8)
    save_plot(fig, "profile_decode" + ("_quick" if quick else ""))


def main() -> None:
    ap = bench_parser(__doc__, quick_help="batch 16 only, no same-budget what-if")
    ap.add_argument("--skip-same-budget", action="store_true", help="no same-budget what-if")
    a = parse(ap)
    doc = run(a.quick, not a.skip_same_budget)
    for c in doc["cases"]:
        print(f"\n{c['twin']} batch {c['batch']}, {c['workload']} (padding efficiency {c['padding_efficiency']:.2f}): "
              f"step {c['step_ms']:.1f} ms, attention {c['attend_ms']:.1f} ms ({c['attend_pct']:.0f}%), "
              f"prepare_step {c['prepare_ms']:.2f} ms")
        for o in c["top_ops"]:
            print(f"   {o['op']:<45} {o['self_ms_per_step']:8.2f} ms/step {o['pct']:5.1f}%  {o['calls_per_step']:.0f} calls")
        print("   what-if decode step: " + ", ".join(f"{k} {v:.1f} ms" for k, v in c["whatif_step_ms"].items()))
    for p in doc["prefill_ms"]:
        print(f"\nprefill of the first {p['batch']} ShareGPT prompts ({p['prompt_tokens']} tokens): "
              + ", ".join(f"{k} {p[k]:.0f} ms" for k in BACKENDS))
    if "whatif_same_budget" in doc:
        w = doc["whatif_same_budget"]
        print(f"\nsame KV budget, ShareGPT: paged/naive {w['after']['ratio']['median']:.2f} with the package's attention,"
              f" {w['before']['ratio']['median']:.2f} with the split-K one it replaced")


if __name__ == "__main__":
    main()

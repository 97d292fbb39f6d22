"""The naive twin's decode with its preallocated rows read in place, against gathering them (before).

Two measurements, each at batch 16 and 64, over the first B ShareGPT prompts (their real, uneven
lengths) and over B uniform prompts of the same mean length:
- attention alone: one decode step's attention calls, all 12 layers of the 100M preset (12 heads
  over 4 KV heads, head_dim 64) over a cache of B rows of 4096 slots, the batch in rows 0..B-1
  (as a static naive batch holds them), with the package's torch backend (rows read in place
  where a decode group's rows lie together) and with `GatheringTorchAttention` (baselines.py:
  every group gathered, as before);
- whole decode steps: the naive and the paged twin's engines over the same batch, taking turns
  step by step, the naive one switching backend every other step (view, paged, gather, paged),
  so that each naive step has a paged step at the same contexts beside it.
Repeats alternate their order; each figure is the median of the per-repeat ratios (CPU time,
one thread), with their range.

    python bench/naive_views.py [--quick] [--repeats N]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # row_metadata

from common import (DTYPE, MAX_SEQ_LEN, MODELS, RandomSpec, bench_parser, budget_for_rows, describe_model,  # noqa: E402
                    load_model, log, make_cache, parse, random_requests, ratio_summary, save_json, sharegpt_requests)
from baselines import GatheringTorchAttention  # noqa: E402
from row_metadata import decode_meta  # noqa: E402

from pagedllama.engine.sequence import Request  # noqa: E402
from pagedllama.model.attention import StepMetadata, TorchAttention  # noqa: E402

MODEL = "100m"
WARM = 2  # decode steps before the timed ones


def workloads(batch: int) -> dict[str, list[Request]]:
    sg = sharegpt_requests(batch)
    mean = round(statistics.mean(len(r.prompt_ids) for r in sg))
    uniform = random_requests(RandomSpec(batch, mean, mean, 1, 1, seed=1))
    return {"ShareGPT prompts": sg, f"uniform {mean}-token prompts": uniform}


def rows_meta(lens: list[int]) -> StepMetadata:
    """A decode step of sequences in rows 0..B-1 with contexts `lens` (this step's token the last)."""
    return decode_meta(list(range(len(lens))), lens, MAX_SEQ_LEN, preallocated=True)


def attention_alone(lens: list[int], repeats: int) -> dict:
    """CPU ms of one decode step's attention (every layer), in place and gathered, paired."""
    args = MODELS[MODEL]
    b, heads, kv_heads, head_dim = len(lens), args.n_heads, args.n_kv_heads, args.head_dim
    g = torch.Generator().manual_seed(0)
    caches = torch.zeros(2, b, MAX_SEQ_LEN, kv_heads, head_dim, dtype=DTYPE)
    caches[:, :, :max(lens)] = torch.randn(2, b, max(lens), kv_heads, head_dim, generator=g).to(DTYPE)
    q = torch.randn(b, heads, head_dim, generator=g).to(DTYPE)
    k, v = (torch.randn(b, kv_heads, head_dim, generator=g).to(DTYPE) for _ in range(2))
    backends = {"in place": TorchAttention(), "gathered": GatheringTorchAttention()}
    outs = {}

    def step(name: str) -> float:
        meta = rows_meta(lens)  # a new step: planned once, by its first layer
        t0 = time.process_time()
        for _ in range(args.n_layers):
            outs[name] = backends[name].forward(q, k, v, caches[0], caches[1], meta, head_dim ** -0.5)
        return 1e3 * (time.process_time() - t0)

    ms: dict[str, list[float]] = {n: [] for n in backends}
    for name in backends:  # warm: scratch buffers grown, kernels touched
        step(name)
    torch.testing.assert_close(outs["in place"], outs["gathered"])
    for r in range(repeats):
        for name in (list(backends) if r % 2 == 0 else list(backends)[::-1]):
            ms[name].append(step(name))
    groups = backends["in place"]._decode_plan(rows_meta(lens))
    return {"ms": ms, "median_ms": {n: statistics.median(t) for n, t in ms.items()},
            "gathered_over_in_place": ratio_summary(ms["gathered"], ms["in place"]),
            "decode_groups": len(groups), "groups_in_place": sum(gr.view is not None for gr in groups)}


def engine_steps(reqs: list[Request], repeats: int) -> dict:
    """CPU ms of whole decode steps: the naive twin (in place / gathered, alternating) and the
    paged twin beside it at the same contexts."""
    model = load_model(MODEL)
    reqs = [Request(r.request_id, r.prompt_ids, 1 + 2 * (WARM + repeats) + 1) for r in reqs]
    budget = budget_for_rows(MODEL, len(reqs))
    engines, prefilling = {}, {}
    for twin in ("naive", "paged"):
        engine = make_cache(twin, MODEL, reqs, budget).engine(model, reqs)
        engine.add(reqs)
        schedule = engine.scheduler.schedule

        def schedule_(schedule=schedule, twin=twin):
            batch, is_prefill = schedule()
            prefilling[twin] = is_prefill
            return batch, is_prefill

        engine.scheduler.schedule = schedule_
        prefilling[twin] = True
        while prefilling[twin]:
            engine.step()
        engines[twin] = engine
    naive_backends = {"naive, in place": TorchAttention(), "naive, gathered": GatheringTorchAttention()}

    def step(twin: str, backend: str | None = None) -> float:
        if backend:
            engines[twin].runner.cache.backend = naive_backends[backend]
        t0 = time.process_time()
        engines[twin].step()
        assert not prefilling[twin]
        return 1e3 * (time.process_time() - t0)

    ms: dict[str, list[float]] = {"naive, in place": [], "paged beside it": [], "naive, gathered": [],
                                  "paged beside that": []}
    for r in range(WARM + repeats):
        order = list(naive_backends) if r % 2 == 0 else list(naive_backends)[::-1]
        pair = {}
        for name in order:
            pair[name], pair["paged", name] = step("naive", name), step("paged")
        if r >= WARM:
            ms["naive, in place"].append(pair["naive, in place"])
            ms["paged beside it"].append(pair["paged", "naive, in place"])
            ms["naive, gathered"].append(pair["naive, gathered"])
            ms["paged beside that"].append(pair["paged", "naive, gathered"])
    return {"ms": ms, "median_ms": {n: statistics.median(t) for n, t in ms.items()},
            "naive_over_paged_in_place": ratio_summary(ms["naive, in place"], ms["paged beside it"]),
            "naive_over_paged_gathered": ratio_summary(ms["naive, gathered"], ms["paged beside that"])}


def run(quick: bool, repeats: int) -> dict:
    doc: dict = {"model": describe_model(MODEL), "repeats": repeats, "cases": []}
    for b in [16] if quick else [16, 64]:
        for label, reqs in workloads(b).items():
            lens = [len(r.prompt_ids) + 1 for r in reqs]  # the first decode step's contexts
            case = {"batch": b, "workload": label, "context_mean": statistics.mean(lens), "context_max": max(lens)}
            log(f"  batch {b}, {label}: attention alone")
            case["attention"] = a = attention_alone(lens, repeats)
            log(f"    in place {a['median_ms']['in place']:.1f} ms, gathered {a['median_ms']['gathered']:.1f} ms "
                f"({a['groups_in_place']} of {a['decode_groups']} groups in place)")
            log(f"  batch {b}, {label}: decode steps, naive beside paged")
            case["steps"] = s = engine_steps(reqs, repeats)
            log(f"    naive/paged: in place {s['naive_over_paged_in_place']['median']:.2f}, "
                f"gathered {s['naive_over_paged_gathered']['median']:.2f}")
            doc["cases"].append(case)
    save_json("naive_views" + ("_quick" if quick else ""), doc)
    return doc


def main() -> None:
    ap = bench_parser(__doc__, quick_help="batch 16 only", repeats=True)
    a = parse(ap)
    doc = run(a.quick, a.repeats)
    print(f"\n{doc['model']}; medians of {doc['repeats']} paired repeats [range]")
    for c in doc["cases"]:
        at, st = c["attention"], c["steps"]
        r, i, gth = at["gathered_over_in_place"], st["naive_over_paged_in_place"], st["naive_over_paged_gathered"]
        print(f"batch {c['batch']:>2}, {c['workload']} (context mean {c['context_mean']:.0f}, max {c['context_max']}): "
              f"attention, 12 layers: in place {at['median_ms']['in place']:.1f} ms, gathered "
              f"{at['median_ms']['gathered']:.1f} ms, gathered/in place {r['median']:.2f} "
              f"[{r['min']:.2f}-{r['max']:.2f}] "
              f"({at['groups_in_place']}/{at['decode_groups']} groups in place); decode step naive/paged: in place "
              f"{i['median']:.2f} [{i['min']:.2f}-{i['max']:.2f}], gathered {gth['median']:.2f} "
              f"[{gth['min']:.2f}-{gth['max']:.2f}]")


if __name__ == "__main__":
    main()

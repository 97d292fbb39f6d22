"""How decode throughput grows with the batch on this machine: the ceiling of what a larger batch buys.

PagedAttention's gain at a fixed KV budget is a larger batch; what that is worth depends on how
throughput scales with the batch. This measures steady-state decode tokens per CPU-second of the
paged twin at batch 1 to 97, uniform contexts, and reports the ratio at the two twins' largest
batches (6 for naive, 28 and 97 for paged on the random and ShareGPT workloads at the same budget):
the most the same-budget ratio can reach here. Each batch is measured in float32 and, where the CPU
has AMX (or the benchmarks run in bfloat16), in bfloat16, side by side: with AMX a bfloat16 matmul
costs little more at batch 97 than at batch 6, as on a GPU.

    python bench/batch_scaling.py [--quick]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (DTYPE, MODELS, save_plot, cpu_has_amx_bf16, describe_model, load_model, log,  # noqa: E402
                    pyplot, save_json, bench_parser, parse)
from overhead import full_step_ms  # noqa: E402

BATCHES = [1, 2, 6, 16, 28, 64, 97]
CONTEXT = 128


def dtypes() -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] if DTYPE == torch.bfloat16 or cpu_has_amx_bf16() else [torch.float32]


def run(quick: bool = False) -> dict:
    doc: dict = {"context": CONTEXT, "batches": BATCHES, "models": {}, "quick": quick}
    for name in (["demo"] if quick else ["demo", "100m"]):
        rows: dict[str, list] = {}
        for dtype in dtypes():
            full_step_ms(load_model(name, dtype), MODELS[name], 4, 16, 2, 1, dtype=dtype)  # warm-up
        for b in BATCHES:
            for dtype in dtypes():  # side by side, batch by batch
                label = str(dtype).removeprefix("torch.")
                fs = full_step_ms(load_model(name, dtype), MODELS[name], b, CONTEXT, 6, 3, dtype=dtype)
                rows.setdefault(label, []).append({"batch": b, "step_ms": fs["median_ms"],
                                                   "tok_per_cpu_s": 1e3 * b / fs["median_ms"]})
                log(f"  {name} {label} batch {b}: decode step {fs['median_ms']:.1f} ms, "
                    f"{rows[label][-1]['tok_per_cpu_s']:.0f} tok/CPU-s")
        doc["models"][name] = {"describe": describe_model(name), "dtypes": {}}
        for label, rs in rows.items():
            by_b = {r["batch"]: r["tok_per_cpu_s"] for r in rs}
            doc["models"][name]["dtypes"][label] = {"rows": rs, "ceiling_28_vs_6": by_b[28] / by_b[6],
                                                    "ceiling_97_vs_6": by_b[97] / by_b[6]}
    save_json("batch_scaling" + ("_quick" if quick else ""), doc)
    plot(doc)
    return doc


def plot(doc: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, m in doc["models"].items():
        for label, d in m["dtypes"].items():
            base = d["rows"][0]["tok_per_cpu_s"]
            ax.plot([r["batch"] for r in d["rows"]], [r["tok_per_cpu_s"] / base for r in d["rows"]],
                    "o-" if label == "bfloat16" else "s--", label=f"{name} {label} (batch 1: {base:.0f} tok/CPU-s)")
    b = doc["batches"]
    ax.plot(b, b, ":", color="gray", label="linear (ideal, weight-bandwidth-bound)")
    for x, t in ((6, "naive max"), (28, "paged max, random"), (97, "paged max, ShareGPT")):
        ax.axvline(x, color="gray", alpha=0.3)
        ax.text(x, 1.05, t, rotation=90, fontsize=7, va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("batch (uniform contexts of %d tokens)" % doc["context"])
    ax.set_ylabel("decode throughput / batch-1 throughput")
    ax.set_title("decode throughput vs batch, 1 CPU thread", fontsize=9)
    ax.legend(fontsize=7)
    save_plot(fig, "batch_scaling" + ("_quick" if doc["quick"] else ""))


def main() -> None:
    a = parse(bench_parser(__doc__, quick_help="demo model only"))
    doc = run(a.quick)
    for name, m in doc["models"].items():
        for label, d in m["dtypes"].items():
            print(f"{name} {label}: " + ", ".join(f"B={r['batch']} {r['tok_per_cpu_s']:.0f}" for r in d["rows"])
                  + f" tok/CPU-s; batch 28 / batch 6 = {d['ceiling_28_vs_6']:.2f}, 97 / 6 = {d['ceiling_97_vs_6']:.2f}")

if __name__ == "__main__":
    main()

"""The markdown tables of BENCHMARKS.md, made from bench/results/DTYPE/*.json, so that every
figure in it is copied by a program from a measured run, never typed by hand.

    python bench/tables.py [--quick] [--dtype bfloat16]   # print the full (or quick) run's tables
    python bench/tables.py --fill BENCHMARKS.md docs/making-it-fast.md   # rewrite their marked tables in place

In the markdown file a table stands between `<!-- table DTYPE/NAME -->` and `<!-- /table -->`
(NAME: summary, throughput, batch_scaling, hf_compare, overhead, profile_decode, compare_commits_REV,
decode_limit_DTYPE, naive_views,
or any of them with `_quick`; `gpu/gpu` for bench/gpu.py's results).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(r: dict) -> str:
    return f"**{r['median']:.2f}** ({r['min']:.2f}-{r['max']:.2f})"


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.0f}"


def source(doc: dict) -> str:
    m = doc["machine"]
    dirty = " (package files modified)" if m.get("package_files_modified") else ""
    return (f"_{doc['time']}, commit `{m['git_commit']}`{dirty}, {m.get('cpu', 'CPU not recorded')}, {m['dtype']}, "
            f"{m['torch_threads']} thread(s)_")


def throughput(doc: dict) -> str:
    attention = f", attention {doc['attention']}" if doc.get("attention", "auto") != "auto" else ""
    out = [source(doc) + attention]
    if doc["same_batch"]:
        out += ["", "Same batch:", ""]
        out.append(table(["model", "workload", "batch", "naive tok/CPU-s", "paged tok/CPU-s",
                          "paged / naive (min-max)", "wall-clock ratio", "identical outputs"],
                         [[r["model"], r["workload"], r["batch"], f"{r['naive_tok_per_cpu_s']:.0f}",
                           f"{r['paged_tok_per_cpu_s']:.0f}", ratio(r["ratio"]), f"{r['ratio']['wall']['median']:.2f}",
                           f"{r['identical_outputs']}/{r['batch']}"] for r in doc["same_batch"]]))
    if not doc["same_budget"]:
        return "\n".join(out)
    out += ["", "Same KV budget, each twin at its largest batch:", ""]
    rows = []
    for r in doc["same_budget"]:
        t = r["tok_per_s"]
        cont = r.get("ratio_vs_naive_continuous")
        rows.append([r["model"], r["workload"], f"{r['budget_bytes'] / 2**20:.1f} MiB", r["naive_batch"],
                     r["paged_batch"], med(t["naive_waves"]["cpu"]),
                     med(t["naive_continuous"]["cpu"]) if "naive_continuous" in t else "-", med(t["paged"]["cpu"]),
                     ratio(r["ratio"]), f"{cont['median']:.2f}" if cont else "-",
                     f"{r['identical_outputs']}/{r['paged_batch']}"])
    out.append(table(["model", "workload", "KV budget", "naive batch", "paged batch", "naive waves tok/CPU-s",
                      "naive continuous", "paged", "paged / naive waves (min-max)", "paged / naive continuous",
                      "identical"], rows))
    return "\n".join(out)


def batch_scaling(doc: dict) -> str:
    out = [source(doc), ""]
    batches = doc["batches"]
    rows = []
    for name, m in doc["models"].items():
        for label, d in m["dtypes"].items():
            rows.append([f"{name} {label}: step ms"] + [f"{r['step_ms']:.1f}" for r in d["rows"]])
            rows.append([f"{name} {label}: tok/CPU-s"] + [f"{r['tok_per_cpu_s']:.0f}" for r in d["rows"]])
    out.append(table(["batch"] + [str(b) for b in batches], rows))
    out.append("")
    out.append(table(["model", "dtype", "batch 28 / batch 6", "batch 97 / batch 6"],
                     [[name, label, f"{d['ceiling_28_vs_6']:.2f}", f"{d['ceiling_97_vs_6']:.2f}"]
                      for name, m in doc["models"].items() for label, d in m["dtypes"].items()]))
    return "\n".join(out)


def hf_compare(doc: dict) -> str:
    if "cases" not in doc:
        return f"(skipped: {doc.get('skipped')})"
    rows = []
    for c in doc["cases"]:
        t = c["tok_per_s"]
        check = c.get("float32", c)
        ag = f"{check['agreement_generate']['requests_identical']}/{check['agreement_generate']['requests']}"
        if "agreement_generate_batch" in check:
            ag += f", {check['agreement_generate_batch']['requests_identical']}/" \
                  f"{check['agreement_generate_batch']['requests']}"
        timed = c["agreement_generate"]["requests_identical"], c.get("agreement_generate_batch", {}).get(
            "requests_identical", "-")
        rows.append([c["model"], c["workload"], med(t["pagedllama"]["cpu"]), med(t["hf_generate"]["cpu"]),
                     med(t["hf_generate_batch"]["cpu"]) if "hf_generate_batch" in t else "-",
                     ratio(c["vs_generate"]), ratio(c["vs_generate_batch"]) if "vs_generate_batch" in c else "-",
                     ag + (" (float32)" if "float32" in c else ""), f"{timed[0]}, {timed[1]}"])
    return "\n".join([source(doc) + f", transformers {doc['transformers']}", "",
                      table(["model", "workload", "pagedllama tok/CPU-s", "HF generate()", "HF generate_batch()",
                             "/ generate() (min-max)", "/ generate_batch() (min-max)", "token-identical requests",
                             "identical in the timed runs"], rows)])


def overhead(doc: dict) -> str:
    b = doc["batches"]
    rows = []
    for twin in ("paged", "naive"):
        dry, prep = doc["dry_step_us"][twin], doc["prepare_step_us"][twin]
        rows.append([f"{twin}: scheduler + allocator, us"] + [f"{x:.0f}" for x in dry])
        rows.append([f"{twin}: prepare_step, us"] + [f"{x:.0f}" for x in prep])
        rows.append([f"{twin}: per request, us"] + [f"{(d + p) / n:.1f}" for d, p, n in zip(dry, prep, b)])
    out = [source(doc), "", table(["batch"] + [str(x) for x in b], rows), ""]
    out.append(table(["model", "full decode step at batch 256", "dry step + prepare_step", "% of the step",
                      "not forward or sampling, in the same steps", "% of the step "],
                     [[name, f"{fs['median_ms']:.1f} ms", f"{fs['overhead_us']:.0f} us", f"{fs['overhead_pct']:.2f}%",
                       f"{fs['in_step_overhead_us']:.0f} us" if "in_step_overhead_us" in fs else "-",
                       f"{fs['in_step_overhead_pct']:.2f}%" if "in_step_overhead_pct" in fs else "-"]
                      for name, fs in doc["full_step_b256"].items()]))
    out.append("")
    out.append(table(["layers"] + [str(n) for n in doc["layers"]],
                     [["overhead at batch 64, us"] + [f"{x:.0f}" for x in doc["by_layers"]["overhead_us"]],
                      ["demo-shaped full step at batch 64, ms"]
                      + [f"{x:.1f}" for x in doc["by_layers"]["demo_shape_full_step_ms"]]]))
    return "\n".join(out)


def short_op(op: str) -> str:
    return "SDPA (CPU flash)" if "scaled_dot_product_flash" in op else op.removeprefix("aten::")


def profile(doc: dict) -> str:
    out = [source(doc), ""]
    rows = []
    for c in doc["cases"]:
        top = ", ".join(f"{short_op(o['op'])} {o['pct']:.0f}%" for o in c["top_ops"][:4])
        w = c["whatif_step_ms"]
        rows.append([c["twin"], c["batch"], c["workload"], f"{c['padding_efficiency']:.2f}", f"{c['step_ms']:.1f}",
                     f"{c['attend_pct']:.0f}%", f"{c['prepare_ms']:.2f}", top]
                    + [f"{v:.1f}" for v in w.values()])
    names = list(doc["cases"][0]["whatif_step_ms"])
    out.append(table(["twin", "batch", "prompts", "padding efficiency", "decode step ms", "attention",
                      "prepare_step ms", "top ops (self CPU)"] + [f"step ms, {n}" for n in names], rows))
    if doc.get("prefill_ms"):
        out.append("")
        out.append(table(["prefill of the first B ShareGPT prompts", "prompt tokens"] + [f"{n}, ms" for n in names],
                         [[p["batch"], p["prompt_tokens"]] + [f"{p[n]:.0f}" for n in names] for p in doc["prefill_ms"]]))
    w = doc.get("whatif_same_budget")
    if w:
        out.append("")
        out.append(table(["same KV budget, ShareGPT (paged / naive waves)", "median (min-max)"],
                         [[k, ratio(v["ratio"])] for k, v in w.items()]))
    return "\n".join(out)


def compare_commits(doc: dict) -> str:
    rows = []
    for key, by_batch in doc["median"]["before"].items():
        unit = "ms" if key.startswith("full") else "us"
        for b, before in by_batch.items():
            after = doc["median"]["after"][key][b]
            rows.append([key, b, f"{before:.1f} {unit}", f"{after:.1f} {unit}", f"{after / before:.2f}"])
    return "\n".join([f"{source(doc)}: `{doc['before']}` against `{doc['after']}`", "",
                      table(["measurement", "batch", "before", "after", "after / before"], rows)])


def gpu(doc: dict) -> str:
    bw, flops = doc["copy_bytes_per_s"], doc["matmul_flops_per_s"]
    a = doc["args"]
    head = (f"_{doc['time']}, {doc['device_name']}, torch {doc['torch']}, {doc['dtype']}, dim {a['dim']}, "
            f"{a['n_layers']} layers, {a['n_heads']} / {a['n_kv_heads']} KV heads, block size {doc['block_size']}_; "
            f"copy bandwidth {bw / 1e9:.0f} GB/s (read + written), matrix product {flops / 1e12:.0f} TFLOP/s")
    out = [head]
    def correctness(rows: list[dict]) -> str:
        def outcome(r: dict) -> list:
            if "error" in r:
                return ["-", f"failed: `{r['error'][:160]}`", "", ""]
            return [r["preemptions"], f"**{r['identical_to_reference']}/{r['requests']}**",
                    f"{r['tokens_before_divergence']}/{r['tokens']}", f"{r['identical_to_first_run']}/{r['requests']}"]

        return table(["model", "twin", "attention", "CUDA graphs", "pool", "preemption", "preemptions",
                      "requests equal to the reference", "tokens before the first difference",
                      "requests equal to the first run"],
                     [[r["model"], r["twin"], r["attention"], "yes" if r["cuda_graphs"] else "no", r["pool"],
                       r["preemption"], *outcome(r)] for r in rows])

    if "correct" in doc:
        out += ["", correctness(doc["correct"])]
    if "kernel" in doc:
        out += ["", table(["batch", "context", "Triton paged, us", "SDPA contiguous, us", "paged / SDPA time",
                           "bytes floor, us", "paged / floor", "max abs diff"],
                          [[r["batch"], r["context"], f"{r['paged_us']:.0f}", f"{r['sdpa_us']:.0f}",
                            f"**{r['paged_us'] / r['sdpa_us']:.2f}**", f"{1e6 * r['kv_bytes'] / bw:.0f}",
                            f"**{r['paged_us'] / (1e6 * r['kv_bytes'] / bw):.2f}**", f"{r['max_abs_diff']:.1e}"]
                           for r in doc["kernel"]])]
    if "decode" in doc:
        out += ["", table(["twin", "batch", "attention", "CUDA graphs", "mean context", "decode step, ms (min-max)",
                           "floor, ms", "floor / step", "tokens equal to eager"],
                          [[r["twin"], r["batch"], r["backend"], "yes" if r["cuda_graphs"] else "no", r["mean_context"],
                            f"{r['step_ms']:.2f} ({r['step_ms_range'][0]:.2f}-{r['step_ms_range'][1]:.2f})",
                            f"{r['floor_ms']:.2f}", f"**{r['floor_ms'] / r['step_ms']:.0%}**",
                            f"{r['identical_to_eager']}/{r['batch']}" if r["cuda_graphs"] else ""]
                           for r in doc["decode"]])]
    if "same_budget" in doc:
        out += ["", table(["same KV budget", "CUDA graphs", "requests (ShareGPT, answers capped)", "naive batch",
                           "paged batch", "naive tok/s (waves)", "paged tok/s", "paged / naive", "identical"],
                          [[f"{r['budget_bytes'] / 2 ** 30:.2f} GiB", "yes" if r["cuda_graphs"] else "no",
                            f"{r['requests']} (at {r['answer_cap']})", r["naive_batch"], r["paged_batch"],
                            f"{r['naive_tok_per_s']:.0f}", f"{r['paged_tok_per_s']:.0f}",
                            f"**{r['paged_tok_per_s'] / r['naive_tok_per_s']:.2f}**",
                            f"{r['identical_requests']}/{r['requests']}"] for r in doc["same_budget"]])]
    if "flex" in doc:
        f = doc["flex"]
        if f["problem"]:
            out += ["", f"flex did not run: `{f['problem']}`"]
        if f["correct"]:
            out += ["", correctness(f["correct"])]
        triton = {(r["batch"], r["context"]): r for r in doc.get("kernel", [])}

        def flex_kernel(r: dict) -> list:
            if "error" in r:
                return [f"failed: `{r['error'][:160]}`", "", "", "", ""]
            t = triton.get((r["batch"], r["context"]))
            return [f"{r['flex_us']:.0f}", f"**{r['flex_us'] / t['paged_us']:.2f}**" if t else "-",
                    f"**{r['flex_us'] / t['sdpa_us']:.2f}**" if t else "-",
                    f"**{r['flex_us'] / (1e6 * t['kv_bytes'] / bw):.2f}**" if t else "-", f"{r['max_abs_diff']:.1e}"]

        if f["kernel"]:
            out += ["", table(["batch", "context", "flex, us", "flex / Triton time", "flex / SDPA time", "flex / floor",
                               "max abs diff"], [[r["batch"], r["context"], *flex_kernel(r)] for r in f["kernel"]])]
    if "flash" in doc:
        f = doc["flash"]
        if f.get("cases"):
            out += ["", table(["batch", "context", "FlashAttention-4 paged, us", "Triton paged, us",
                               "flash / Triton time", "max abs diff"],
                              [[r["batch"], r["context"], f"{r['flash_us']:.0f}", f"{r['triton_us']:.0f}",
                                f"**{r['flash_us'] / r['triton_us']:.2f}**", f"{r['max_abs_diff']:.1e}"]
                               for r in f["cases"]])]
        if not f["available"]:
            out += ["", f"flash-attn did not run: `{f['error']}`"]
    return "\n".join(out)


def decode_limit(doc: dict) -> str:
    (dtype, d), = doc["dtypes"].items()
    bw = doc["read_bandwidth_gbs"]

    def ms(r: dict) -> str:
        return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"

    amx = "AMX" if doc["machine"].get("amx_bf16") else "no AMX"
    parts = "; ".join(f"{part} {when}" for part, when in d.get("measured", {}).items())
    out = [f"{source({**doc, 'machine': {**doc['machine'], 'dtype': dtype}})}; {amx}; {doc['model']}; read bandwidth {bw:.1f} GB/s, `F.linear` peak "
           f"{d['matmul_peak_gflops']:.0f} GFLOP/s in {dtype}" + (f" (parts measured: {parts})" if parts else ""), "",
           table(["batch", "context", "torch (gather + SDPA), ms", "flex (in place), ms", "flex / torch",
                  "bytes floor, ms", "floor / torch", "floor / flex"],
                 [[r["batch"], r["context"], ms(r["ms"]["torch"]), ms(r["ms"]["flex"]),
                   f"**{r['ms']['flex']['median'] / r['ms']['torch']['median']:.2f}**", f"{r['floor_ms']:.2f}",
                   f"{r['floor_ms'] / r['ms']['torch']['median']:.0%}", f"{r['floor_ms'] / r['ms']['flex']['median']:.0%}"]
                  for r in d["attention"]]), "",
           table(["decode step, batch", "context", "torch, ms", "flex, ms", "limit, ms (bytes / FLOPs)",
                  "limit / torch", "limit / flex", "its matmuls alone, ms", "limit / matmuls alone"],
                 [[r["batch"], r["context"], ms(r["ms"]["torch"]), ms(r["ms"]["flex"]),
                   f"{r['limit_ms']:.1f} ({r['bytes_ms']:.1f} / {r['flops_ms']:.1f})",
                   f"**{r['limit_ms'] / r['ms']['torch']['median']:.0%}**",
                   f"**{r['limit_ms'] / r['ms']['flex']['median']:.0%}**",
                   ms(r["matmuls_alone_ms"]) if "matmuls_alone_ms" in r else "-",
                   f"{r['limit_ms'] / r['matmuls_alone_ms']['median']:.0%}" if "matmuls_alone_ms" in r else "-"]
                  for r in d["step"]])]
    if d.get("blocks"):
        at_16 = {(r["batch"], r["context"]): r["ms"]["flex"]["median"] for r in d["blocks"] if r["block_size"] == 16}
        out += ["", table(["batch", "context", "block size (flex tile)", "torch (gather + SDPA), ms", "flex (in place), ms",
                           "flex / torch", "flex / flex at block 16", "floor / flex"],
                          [[r["batch"], r["context"], r["block_size"], ms(r["ms"]["torch"]), ms(r["ms"]["flex"]),
                            f"**{r['ms']['flex']['median'] / r['ms']['torch']['median']:.2f}**",
                            f"{r['ms']['flex']['median'] / at_16[r['batch'], r['context']]:.2f}",
                            f"{r['floor_ms'] / r['ms']['flex']['median']:.0%}"] for r in d["blocks"]])]
    if d.get("chunk"):
        out += ["", table(["prompt chunk after cached context", "torch (gather + SDPA), ms per layer",
                           "flex (in place), ms per layer", "flex / torch"],
                          [[f"{r['chunk']} tokens after {r['cached']}", ms(r["ms"]["torch"]), ms(r["ms"]["flex"]),
                            f"**{r['ms']['flex']['median'] / r['ms']['torch']['median']:.2f}**"]
                           for r in d["chunk"]])]
    return "\n".join(out)


def naive_views(doc: dict) -> str:
    rows = []
    for c in doc["cases"]:
        a, st = c["attention"], c["steps"]
        rows.append([c["workload"], c["batch"], f"{c['context_mean']:.0f} / {c['context_max']}",
                     f"{a['groups_in_place']} of {a['decode_groups']}",
                     ratio(a["gathered_over_in_place"]), ratio(st["naive_over_paged_in_place"]),
                     ratio(st["naive_over_paged_gathered"])])
    return "\n".join([f"{source(doc)}; {doc['model']}; {doc['repeats']} paired repeats", "",
                      table(["contexts", "batch", "mean / longest context", "decode groups read in place",
                             "attention: gathered / in place", "step time: naive in place / paged",
                             "step time: naive gathered / paged"], rows)])


RENDER = {"throughput": throughput, "batch_scaling": batch_scaling, "hf_compare": hf_compare, "overhead": overhead,
          "profile_decode": profile, "compare_commits": compare_commits, "gpu": gpu,
          "decode_limit": decode_limit, "naive_views": naive_views}
MARKED = re.compile(r"(<!-- table (\w+)/(\w+) -->\n).*?(<!-- /table -->)", re.S)


def render(dtype: str, name: str) -> str:
    if name.startswith("summary"):  # run.py's own table, as it printed it
        path = RESULTS / dtype / f"{name}.md"
        return path.read_text().strip() if path.exists() else "(no results)"
    doc = load(RESULTS / dtype, name)
    if doc is None:
        return "(no results)"
    key = next((k for k in ("compare_commits", "decode_limit", "throughput") if name.startswith(k)),
               name.removesuffix("_quick"))
    try:
        return RENDER[key](doc)
    except KeyError as e:  # written by an older version of the script
        return f"(results in an older format, no {e}: rerun bench/{name.removesuffix('_quick')}.py)"


def fill(path: Path) -> None:
    text = path.read_text()
    path.write_text(MARKED.sub(lambda m: m.group(1) + render(m.group(2), m.group(3)) + "\n" + m.group(4), text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", help="the results folder: bfloat16 or float32")
    ap.add_argument("--fill", type=Path, nargs="+", help="markdown files whose marked tables to rewrite")
    a = ap.parse_args()
    if a.fill:
        for path in a.fill:
            fill(path)
        return
    for name in RENDER:
        print(f"\n### {name}\n")
        if name == "compare_commits":
            for path in sorted((RESULTS / a.dtype).glob(f"{name}_*.json")):
                print(render(a.dtype, path.stem) + "\n")
            continue
        print(render(a.dtype, name + ("_quick" if a.quick else "")))


if __name__ == "__main__":
    main()

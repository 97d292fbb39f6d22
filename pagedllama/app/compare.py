"""Both twins on the same requests, side by side: reports, max-batch limits, and plots.

    python -m pagedllama.compare BATCH_SIZE [the twins' flags] [--plots-dir DIR]

Runs the model when there is one (the demo by default), or dry runs with --simulate or
--dry-run. The plots are PNG files (matplotlib's Agg backend, no display needed). Besides the
twins (the naive one reserving max_seq_len), the naive twin's other reservation policies, pow2 and
oracle, run on the same requests for the vLLM paper's four-way breakdown of the KV memory; for a
model that stops by itself they reserve for the answer lengths the paged run produced (a policy
changes memory, never the output).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..engine.budget import cache_layout  # noqa: E402
from ..engine.config import TWINS, EngineConfig  # noqa: E402
from ..engine.engine import build_engine  # noqa: E402
from ..engine.memory import MemorySample  # noqa: E402
from ..engine.reservation import RESERVE_POLICIES  # noqa: E402
from ..engine.sequence import Request  # noqa: E402
from ..engine.waste import WasteBreakdown  # noqa: E402
from ..errors import OutOfKVMemory, UsageError, UserError  # noqa: E402
from ..model.backends import select_backend  # noqa: E402
from ..units import GB  # noqa: E402
from .capacity import dry_run, find_max_batch  # noqa: E402
from ..model.parallel import SINGLE, TensorParallel  # noqa: E402
from .cli import (Setup, build_parser, generate, one_or_many_ranks, prepare, run_reporting_errors,  # noqa: E402
                  scheduler_json, silent_rank)
from .report import format_memory_report, timeline_json  # noqa: E402
from .waste import format_waste_table, plot_breakdown, system_label, system_name, waste_json  # noqa: E402

BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)


@dataclass
class TwinRun:
    twin: str
    memory: dict | None = None
    scheduler: dict | None = None
    timeline: list[MemorySample] | None = None
    error: str | None = None
    waste: WasteBreakdown | None = None
    output_lens: dict[str, int] | None = None  # a real run's answer lengths, per request


def parser() -> argparse.ArgumentParser:
    p = build_parser("paged")
    p.prog = "python -m pagedllama.compare"
    p.description = "Run the naive and paged twins on the same requests and compare their KV memory."
    p.add_argument("--dry-run", action="store_true", help="no forward pass even when a model is loaded")
    p.add_argument("--plots-dir", type=Path, default=Path("out"), help="where the PNG plots go (default out/)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (and the block-size sweep)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_reporting_errors(lambda: one_or_many_ranks(args, compare_rank), args.debug)


def compare_rank(tp: TensorParallel, args: argparse.Namespace) -> int:
    """One rank's comparison (rank 0 reports, plots and writes --json)."""
    return compare(silent_rank(args, tp), tp)


def twin_config(setup: Setup, twin: str, **changes) -> EngineConfig:
    """The EngineConfig prepare() built, for `twin` (and any other `changes`)."""
    return replace(setup.config, twin=twin, **changes)


def run_twin(twin: str, args: argparse.Namespace, setup: Setup, reserve: str = "max",
             batch: list[Request] | None = None) -> TwinRun:
    """One system on the batch (or on `batch`, the same requests with their answer lengths known)."""
    loaded, batch = setup.loaded, batch or setup.batch
    config = twin_config(setup, twin, reserve=reserve)
    try:
        if setup.planning or args.dry_run:
            r = dry_run(config, setup.budget.kv_bytes, batch)
            if r.error:
                return TwinRun(twin, error=r.error)
            return TwinRun(twin, r.memory, scheduler_json(r.stats), r.timeline, waste=r.waste)
        # the backend prepare() picked for both twins
        engine = build_engine(config, setup.budget.kv_bytes, batch, loaded.model, setup.backend)
    except OutOfKVMemory as e:
        return TwinRun(twin, error=str(e))
    print(f"running {system_name(config)}...", file=sys.stderr)
    result = generate(args, loaded, engine, batch, setup.budget.kv_bytes)
    return TwinRun(twin, result["memory"], scheduler_json(result["stats"]), result["timeline"], waste=result["waste"],
                   output_lens={a["id"]: a["output_tokens"] for a in result["requests"]})


def side_by_side(naive: TwinRun, paged: TwinRun, title: str) -> str:
    left = _report_lines(naive, title.replace("TWIN", "naive"))
    right = _report_lines(paged, title.replace("TWIN", "paged"))
    width = max(len(line) for line in left) + 4
    rows = [f"{a:<{width}}{b}" for a, b in zip(left + [""] * (len(right) - len(left)),
                                                   right + [""] * (len(left) - len(right)))]
    return "\n".join(rows)


def _report_lines(run: TwinRun, title: str) -> list[str]:
    if run.error:
        return [title, "-" * len(title), *_wrap(f"  did not run: {run.error}", 60)]
    lines = format_memory_report(run.memory, title).splitlines()
    s = run.scheduler
    lines.append(f"  peak running {s['peak_running']}; waited for memory {s['waited_for_memory']}, "
                 f"preempted {s['preemptions']}; fits in memory: {'yes' if s['fits_in_memory'] else 'no'}")
    return lines


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = "   " + w
        else:
            line = f"{line} {w}" if line else w
    return lines + [line]


def compare(args: argparse.Namespace, tp: TensorParallel = SINGLE) -> int:
    if args.batch_size is None:
        raise UsageError("give BATCH_SIZE, the number of prompts both twins run")
    setup = prepare("paged", args, whole_dataset=True, tp=tp)
    if not args.no_plots:  # before the runs, so a bad path fails at once
        try:
            args.plots_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--plots-dir {args.plots_dir}: cannot create it ({e.strerror}); pick another "
                            "directory or pass --no-plots") from None
    print(f"compare: {setup.header}")
    if setup.backend and not args.dry_run:
        # `auto` gave the paged twin a kernel that the naive twin's blocks allow too; an explicit choice
        # must suit both as well.
        naive_block = cache_layout(twin_config(setup, "naive"), 0).block_size
        select_backend(args.attention, setup.device, setup.dtype, naive_block, args.block_size,
                       setup.loaded.args.num_params())
        print(f"attention backend: {setup.backend.name} (both twins)")
    runs = {twin: run_twin(twin, args, setup) for twin in TWINS}
    print()
    print(side_by_side(runs["naive"], runs["paged"], f"TWIN, {setup.batch_size} requests"))
    configs = {system_name(c): c for c in (twin_config(setup, "naive", reserve=policy) for policy in RESERVE_POLICIES)}
    configs["paged"] = twin_config(setup, "paged")
    systems = {"naive": runs["naive"], **policy_runs(args, setup, runs), "paged": runs["paged"]}
    breakdowns = {system_label(configs[n]): r.waste for n, r in systems.items() if r.waste is not None}
    print()
    for at in ("peak", "average"):
        print(format_waste_table(breakdowns, at))
    for name, r in systems.items():
        if r.error:
            print(f"  {system_label(configs[name])} did not run: {r.error}")

    loaded, budget = setup.loaded, setup.budget.kv_bytes
    limits = {name: find_max_batch(config, budget, setup.requests) for name, config in configs.items()}
    (k_naive, _), (k_paged, exhausted) = limits["naive"], limits["paged"]
    ratio = k_paged / k_naive if k_naive else float("inf")
    more = " (every usable conversation fits: the true limit is higher)" if exhausted else ""
    print(f"\nlargest batch that fits in KV memory: naive {k_naive}, paged {k_paged}{more}; "
          f"paged / naive = {ratio:.1f}x")
    print("  by reservation policy: " + ", ".join(f"{system_label(configs[n])} {k}" + ("+" if full else "")
                                                 for n, (k, full) in limits.items()))
    doc = {"batch_size": setup.batch_size, "dtype": str(setup.dtype).removeprefix("torch."),
           "dtype_reason": setup.dtype_reason, "kv_budget_bytes": budget, "block_size": args.block_size,
           "attention": setup.backend.name if setup.backend and not args.dry_run else None,
           "max_batch": {"naive": k_naive, "paged": k_paged}, "max_batch_ratio": ratio,
           "twins": {t: {"memory": r.memory, "scheduler": r.scheduler, "error": r.error,
                         "timeline": timeline_json(r.timeline, r.memory["bytes_per_token"]) if r.timeline else None}
                     for t, r in runs.items()},
           "systems": {name: {"label": system_label(configs[name]), "max_batch": limits[name][0],
                              "max_batch_exhausted_dataset": limits[name][1], "error": r.error,
                              "waste": waste_json(configs[name], r.waste) if r.waste else None}
                       for name, r in systems.items()}}
    if not args.no_plots:
        model = args.simulate or ("demo model" if loaded.is_demo else args.model)
        shown, batch = timeline_runs(runs, setup, k_naive)
        timeline_png = plot_timelines(shown, budget, batch, model, args.plots_dir / "memory_timeline.png")
        sweep = block_size_sweep(setup)
        sweep_png = plot_sweep(sweep, k_naive, setup.batch_size, args.plots_dir / "block_size_sweep.png")
        doc["block_size_sweep"] = sweep
        breakdown_png = plot_breakdown(breakdowns, args.plots_dir / "kv_breakdown.png")
        print(f"plots: {timeline_png}, {sweep_png}, {breakdown_png}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def policy_runs(args: argparse.Namespace, setup: Setup, runs: dict[str, TwinRun]) -> dict[str, TwinRun]:
    """The naive twin reserving by `pow2` and `oracle` on the same requests. A model that stops by
    itself gets the answer lengths of the twins' own run (the paged one's, or the naive one's)."""
    batch, policies = setup.batch, [p for p in RESERVE_POLICIES if p != "max"]
    stops = not (setup.planning or args.dry_run or setup.config.ignore_eos) and setup.config.stop_ids
    if stops:
        lens = next((r.output_lens for r in (runs["paged"], runs["naive"]) if r.output_lens), None)
        if lens is None:
            error = "neither twin ran the batch, so the answer lengths that pow2 and oracle reserve for are unknown"
            return {f"naive-{p}": TwinRun("naive", error=error) for p in policies}
        batch = [replace(r, output_len=lens[r.request_id]) for r in batch]
    return {f"naive-{p}": run_twin("naive", args, setup, p, batch) for p in policies}


def timeline_runs(runs: dict[str, TwinRun], setup: Setup, k_naive: int) -> tuple[dict[str, TwinRun], int]:
    """Both twins' step-by-step memory and their batch; if naive could not run the batch, dry runs at
    the batch it can hold."""
    if all(r.timeline for r in runs.values()) or k_naive == 0:
        return runs, setup.batch_size
    batch = setup.requests[:k_naive]
    out = {}
    for twin in TWINS:
        r = dry_run(twin_config(setup, twin), setup.budget.kv_bytes, batch)
        out[twin] = TwinRun(twin, r.memory, scheduler_json(r.stats), r.timeline)
    print(f"(the memory timeline shows {k_naive} requests, the most the naive twin can hold)", file=sys.stderr)
    return out, k_naive


def block_size_sweep(setup: Setup) -> list[dict]:
    """For each block size: fragmentation at the batch size, and the largest batch that fits."""
    loaded, budget = setup.loaded, setup.budget.kv_bytes
    rows = []
    for bs in (b for b in BLOCK_SIZES if b <= loaded.max_seq_len):
        config = twin_config(setup, "paged", block_size=bs)
        r = dry_run(config, budget, setup.batch)
        k, _ = find_max_batch(config, budget, setup.requests)
        rows.append({"block_size": bs, "max_batch": k, "measured_at_batch": setup.batch_size,
                     "fragmented_fraction_of_budget": r.memory["fragmented_fraction_of_budget"] if r.memory else None,
                     "peak_utilization": r.memory["peak_utilization"] if r.memory else None})
        at_batch = (f"{100 * r.memory['fragmented_fraction_of_budget']:.2f}% of budget fragmented at peak"
                    if r.memory else f"does not run: {r.error}")
        print(f"  block size {bs:>3}: largest batch {k:>4}; at batch {setup.batch_size}, {at_batch}", file=sys.stderr)
    return rows


def plot_timelines(runs: dict[str, TwinRun], budget: int, batch: int, model: str, path: Path) -> Path:
    """Reserved and holding memory per step for both twins, in GB, or MB for budgets under 1 GB.

    Reserved is a wide pale line under holding's narrow dashed one, so both show where they nearly
    coincide (the paged twin); when the twins hold the same tokens at every step (the same
    schedule), one holding line stands for both rather than one hiding the other.
    """
    unit, scale = ("GB", GB) if budget >= GB else ("MB", 1 << 20)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = {"naive": "tab:red", "paged": "tab:blue"}
    holding = {}
    for twin, run in runs.items():
        if run.timeline:
            slot = run.memory["bytes_per_token"] / scale
            ax.plot([s.reserved_tokens * slot for s in run.timeline], color=colors[twin], lw=4, alpha=0.4,
                    label=f"{twin}: reserved")
            holding[twin] = [s.used_tokens * slot for s in run.timeline]
    if len(holding) == 2 and holding["naive"] == holding["paged"]:
        ax.plot(holding["paged"], color="black", lw=1.2, ls="--", label="both: holding tokens")
    else:
        for twin, used in holding.items():
            ax.plot(used, color=colors[twin], lw=1.2, ls="--", label=f"{twin}: holding tokens")
    ax.axhline(budget / scale, color="black", lw=0.8, ls=":", label=f"KV budget ({budget / scale:.2f} {unit})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"KV memory ({unit})")
    ax.set_ylim(0, 1.15 * budget / scale)
    ax.set_title(f"{model}, {batch} requests: KV memory reserved vs holding tokens (the gap is fragmentation)",
                 fontsize=10)
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(sweep: list[dict], k_naive: int, batch: int, path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [str(r["block_size"]) for r in sweep]
    left.bar(labels, [100 * (r["fragmented_fraction_of_budget"] or 0) for r in sweep], color="tab:blue")
    left.set_xlabel("block size (tokens)")
    left.set_ylabel("fragmented at peak (% of KV budget)")
    left.set_title(f"Paged fragmentation at batch {batch}")
    right.plot(labels, [r["max_batch"] for r in sweep], "o-", color="tab:blue", label="paged")
    right.axhline(k_naive, color="tab:red", ls="--", label=f"naive ({k_naive})")
    right.set_xlabel("block size (tokens)")
    right.set_ylabel("largest batch that fits in KV memory")
    right.set_title("Largest batch vs block size")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())

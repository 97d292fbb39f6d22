"""What the cache manager and scheduler cost per decode step, against the step itself.

All times are this process's CPU time (one intra-op thread), so another tenant holding the core
does not count.

- Dry run (`Engine(model=None)`, no KV storage): scheduler + allocator + bookkeeping of one
  decode step (admission check, a free slot for every sequence, new blocks every block_size
  tokens, commit, memory sample, stop checks), for both twins, batch 1 to 512.
- `ModelRunner.prepare` with storage (a tiny model): the per-step tensors (tokens, positions,
  slot mapping, block tables, lengths) the forward pass needs, built once per step.
- Both against the measured full decode step (forward + sampling + the above) of the demo and
  the 100M preset at batch 256; and, measured inside those same steps (so the machine's drifts
  between measurements do not enter), the part of each step that is neither the forward pass
  nor sampling. Target: overhead < 2% of the step, flat per request.
- As layers grow: the same overhead for models of 1 to 32 layers (it is per step, not per layer)
  next to the full step of the demo shape at those depths.

    python bench/overhead.py [--quick]
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (BLOCK_SIZE, CPU, DTYPE, MODELS, CachePlan, save_plot, describe_model, load_model, log,  # noqa: E402
                    pyplot, save_json, bench_parser, parse, print_summary)

from pagedllama.engine.config import EngineConfig  # noqa: E402
from pagedllama.engine.engine import Engine  # noqa: E402
from pagedllama.engine.sequence import Request  # noqa: E402
from pagedllama.io.checkpoint import build_model, random_state_dict  # noqa: E402
from pagedllama.model.attention import TorchAttention  # noqa: E402
from pagedllama.model.config import DEMO_ARGS, ModelArgs  # noqa: E402

MAX_SEQ_LEN = 1024
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=160)


class StubModel:
    """Stands in for the forward pass: logits of zeros, so a step costs only what is not the model."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, tokens, positions, cache, meta):
        return torch.zeros(len(meta.logits_indices), self.vocab)


def requests(batch: int, prompt: int, out: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    # prompts of slightly different lengths, so blocks fill (and new ones are taken) on different steps
    return [Request(f"r{i}", [rng.randrange(256) for _ in range(prompt + rng.randrange(BLOCK_SIZE))], out)
            for i in range(batch)]


def cache_for(args: ModelArgs, twin: str, reqs: list[Request], storage: bool, dtype: torch.dtype = DTYPE,
              max_seq_len: int = MAX_SEQ_LEN, backend=None, device: torch.device = CPU, **options) -> CachePlan:
    """A cache that holds the whole batch: naive rows of `max_seq_len`, or exactly enough paged blocks
    (`backend`: the torch one by default; `options`: more EngineConfig fields)."""
    bpt = args.kv_bytes_per_token(dtype.itemsize)
    if twin == "naive":
        # The scheduler keeps 1% of the blocks free (its watermark) while anything runs, and the
        # naive cache has exactly one row per request, so from batch 100 on the last requests would
        # wait; spare rows (sized through extra placeholder requests) keep the whole batch resident.
        reqs = reqs + reqs[:len(reqs) // 99 + 1]
        budget = len(reqs) * max_seq_len * bpt
        num_blocks = None
    else:
        num_blocks = sum(-(-(len(r.prompt_ids) + r.max_new_tokens) // BLOCK_SIZE) for r in reqs) + 1
        budget = num_blocks * BLOCK_SIZE * bpt
    if storage and backend is None:
        backend = TorchAttention()
    config = EngineConfig(twin, args, max_seq_len, dtype, device, BLOCK_SIZE, num_blocks=num_blocks, ignore_eos=True,
                          **options)
    return CachePlan(config, budget, backend, sized_for=reqs)


def timed_run(engine: Engine, reqs: list[Request]) -> dict[str, list[float]]:
    """Run `reqs` through `engine.run`, timing each decode step and, within it, `ModelRunner.prepare`,
    the forward pass and the sampling (`Engine._next_tokens`).

    The engine's own methods are wrapped on the instance, so nothing in the package changes;
    prefill steps are told apart by the flag the scheduler returns.
    """
    flags: list[bool] = []
    steps: list[float] = []
    prep: list[float] = []
    inner = {"forward": 0.0, "sample": 0.0}
    forward_sample: list[float] = []
    runner = engine.runner  # None in a dry run
    schedule, step, next_tokens = engine.scheduler.schedule, engine.step, engine._next_tokens

    def timed(key, fn):
        def wrapper(*args):
            t0 = time.process_time()
            out = fn(*args)
            inner[key] += time.process_time() - t0
            return out
        return wrapper

    def schedule_():
        batch, is_prefill = schedule()
        flags.append(is_prefill)
        return batch, is_prefill

    def step_():
        inner["forward"] = inner["sample"] = 0.0
        t0 = time.process_time()
        out = step()
        if not flags[-1]:
            steps.append(time.process_time() - t0)
            forward_sample.append(inner["forward"] + inner["sample"])
        return out

    engine.scheduler.schedule, engine.step = schedule_, step_
    engine._next_tokens = timed("sample", next_tokens)
    if runner is not None:
        prepare = runner.prepare

        def prepare_(seqs, is_prefill, *args, **kwargs):
            t0 = time.process_time()
            out = prepare(seqs, is_prefill, *args, **kwargs)
            if not is_prefill:
                prep.append(time.process_time() - t0)
            return out

        runner.prepare = prepare_
        runner.model = timed("forward", runner.model)
    engine.run(reqs, progress=False)
    stats = engine.scheduler.stats
    assert stats.peak_running == len(reqs) and stats.preemptions == 0, stats  # the whole batch ran at once
    # the rest of each step: scheduler, cache manager (prepare_step included) and bookkeeping
    rest = [st - fs for st, fs in zip(steps, forward_sample)]
    return {"step": steps, "prepare": prep, "rest": rest, "rest_share": [r / st for r, st in zip(rest, steps)]}


def _engine(model, cache: CachePlan) -> Engine:
    return cache.engine(model, cache.sized_for)


def dry_step_us(twin: str, batch: int, out: int, repeats: int) -> float:
    """Median decode-step time of the dry run (no storage, no forward), median over repeats."""
    meds = []
    for rep in range(repeats):
        reqs = requests(batch, 64, out, seed=rep)
        t = timed_run(_engine(None, cache_for(DEMO_ARGS, twin, reqs, storage=False)), reqs)
        meds.append(statistics.median(t["step"]))
    return 1e6 * statistics.median(meds)


def prepare_step_us(args: ModelArgs, twin: str, batch: int, steps: int, repeats: int) -> tuple[float, float]:
    """Median time of `ModelRunner.prepare` in decode steps, with KV storage, and of the whole step
    around it with a stub forward (scheduler + prepare_step + sampling + bookkeeping)."""
    prep, whole = [], []
    for rep in range(repeats):
        reqs = requests(batch, 64, steps + 1, seed=rep)
        t = timed_run(_engine(StubModel(args.vocab_size), cache_for(args, twin, reqs, storage=True)), reqs)
        prep.append(statistics.median(t["prepare"]))
        whole.append(statistics.median(t["step"]))
    return 1e6 * statistics.median(prep), 1e6 * statistics.median(whole)


def full_step_ms(model, args: ModelArgs, batch: int, prompt: int, steps: int, repeats: int,
                 twin: str = "paged", dtype: torch.dtype = DTYPE) -> dict:
    """Decode-step CPU time of the real engine (forward included), and the part of each step that
    is neither the forward pass nor sampling, measured within the same steps: medians over
    `repeats` runs of the per-run medians."""
    meds, rest, share = [], [], []
    for rep in range(repeats):
        reqs = requests(batch, prompt, steps + 1, seed=rep)
        t = timed_run(_engine(model, cache_for(args, twin, reqs, storage=True, dtype=dtype)), reqs)
        meds.append(statistics.median(t["step"]))
        rest.append(statistics.median(t["rest"]))
        share.append(statistics.median(t["rest_share"]))
    return {"median_ms": 1e3 * statistics.median(meds), "per_repeat_ms": [1e3 * m for m in meds],
            "in_step_overhead_us": 1e6 * statistics.median(rest),
            "in_step_overhead_pct": 100 * statistics.median(share),
            "steps_per_repeat": steps, "context": prompt + BLOCK_SIZE // 2 + steps // 2}


def run(quick: bool) -> dict:
    repeats = 3
    batches = [1, 4, 16, 64, 256, 512] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    out = 32 if quick else 128
    doc: dict = {"quick": quick, "batches": batches, "dry_step_us": {}, "prepare_step_us": {}, "stub_step_us": {},
                 "models": {m: describe_model(m) for m in MODELS}}
    log("  overhead: dry-run decode step (scheduler + allocator + bookkeeping), both twins")
    for twin in ("naive", "paged"):
        doc["dry_step_us"][twin] = [dry_step_us(twin, b, out, repeats) for b in batches]
        log(f"    {twin}: " + ", ".join(f"B={b} {t:.0f}us" for b, t in zip(batches, doc["dry_step_us"][twin])))
    log("  overhead: prepare_step with storage (tiny model)")
    for twin in ("naive", "paged"):
        res = [prepare_step_us(TINY, twin, b, 12 if quick else 48, repeats) for b in batches]
        doc["prepare_step_us"][twin] = [p for p, _ in res]
        doc["stub_step_us"][twin] = [w for _, w in res]
        log(f"    {twin}: " + ", ".join(f"B={b} {p:.0f}us (whole step, stub forward: {w:.0f}us)"
                                       for b, (p, w) in zip(batches, res)))

    # layers: bookkeeping is per step; the forward grows with depth
    layers = [1, 4, 16] if quick else [1, 4, 16, 32]
    doc["layers"] = layers
    doc["by_layers"] = {"overhead_us": [], "demo_shape_full_step_ms": []}
    lb = 64
    log(f"  overhead vs layers at batch {lb}")
    for n in layers:
        tiny = replace(TINY, n_layers=n)
        ov = dry_step_us("paged", lb, out, repeats) + prepare_step_us(tiny, "paged", lb, 16, repeats)[0]
        shape = replace(DEMO_ARGS, n_layers=n)
        model = build_model(shape, random_state_dict(shape, 0), CPU, DTYPE, MAX_SEQ_LEN)
        full_step_ms(model, shape, 4, 16, 2, 1)  # warm-up
        fs = full_step_ms(model, shape, lb, 64, 8 if quick else 16, repeats)
        doc["by_layers"]["overhead_us"].append(ov)
        doc["by_layers"]["demo_shape_full_step_ms"].append(fs["median_ms"])
        log(f"    {n} layers: overhead {ov:.0f} us, demo-shaped full step {fs['median_ms']:.1f} ms")

    # full steps at batch 256
    doc["full_step_b256"] = {}
    b = 256
    i = batches.index(b)
    for name in MODELS:
        model = load_model(name)
        prompt = 8 if (quick and name == "100m") else 64
        fs = full_step_ms(model, MODELS[name], b, prompt, 4 if name == "100m" else 16, repeats)
        ov_us = doc["dry_step_us"]["paged"][i] + doc["prepare_step_us"]["paged"][i]
        fs["overhead_us"] = ov_us
        fs["overhead_pct"] = 100 * ov_us / (1e3 * fs["median_ms"])
        fs["stub_step_us"] = doc["stub_step_us"]["paged"][i]
        fs["stub_step_pct"] = 100 * fs["stub_step_us"] / (1e3 * fs["median_ms"])
        doc["full_step_b256"][name] = fs
        log(f"    {name} full decode step at B=256 (context ~{fs['context']}): {fs['median_ms']:.1f} ms; "
            f"overhead {ov_us:.0f} us = {fs['overhead_pct']:.2f}%; within the same steps "
            f"{fs['in_step_overhead_us']:.0f} us = {fs['in_step_overhead_pct']:.2f}%")
    save_json("overhead" + ("_quick" if quick else ""), doc)
    plot(doc)
    return doc


def plot(doc: dict) -> None:
    plt = pyplot()
    b = doc["batches"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    for twin, style in (("naive", "--"), ("paged", "-")):
        ax.plot(b, doc["dry_step_us"][twin], style + "o", label=f"{twin}: scheduler+allocator (dry run)")
        ax.plot(b, doc["prepare_step_us"][twin], style + "s", label=f"{twin}: prepare_step")
        ax.plot(b, doc["stub_step_us"][twin], style + "^", label=f"{twin}: whole step, stub forward", alpha=0.6)
    for name, fs in doc["full_step_b256"].items():
        ax.scatter([256], [1e3 * fs["median_ms"]], marker="*", s=120, label=f"{name}: full decode step (B=256)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (running sequences)")
    ax.set_ylabel("us per decode step")
    ax.legend(fontsize=7)
    ax.set_title("per step", fontsize=9)
    ax = axes[1]
    for twin, style in (("naive", "--"), ("paged", "-")):
        per = [(d + p) / n for d, p, n in zip(doc["dry_step_us"][twin], doc["prepare_step_us"][twin], b)]
        ax.plot(b, per, style + "o", label=twin)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("us per request per step (overhead)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("per request: should stay flat", fontsize=9)
    ax = axes[2]
    L = doc["layers"]
    ax.plot(L, [u / 1e3 for u in doc["by_layers"]["overhead_us"]], "o-", label="overhead (ms), batch 64")
    ax.plot(L, doc["by_layers"]["demo_shape_full_step_ms"], "s-", label="full step (ms), demo shape, batch 64")
    ax.set_xlabel("layers")
    ax.set_ylabel("ms per decode step")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("as layers grow", fontsize=9)
    save_plot(fig, "overhead" + ("_quick" if doc["quick"] else ""))


def summary_rows(doc: dict) -> list[tuple]:
    rows = []
    for name, fs in doc["full_step_b256"].items():
        pct = fs["in_step_overhead_pct"]
        rows.append((f"cache manager + scheduler, % of a {name} decode step at batch 256 "
                     f"({fs['in_step_overhead_us']:.0f} us of {fs['median_ms']:.0f} ms, in the same steps)", pct,
                     "< 2%", pct < 2, None))
    b = doc["batches"]
    per = [(d + p) / n for d, p, n in zip(doc["dry_step_us"]["paged"], doc["prepare_step_us"]["paged"], b)]
    i16, i512 = b.index(16), b.index(512)
    rows.append((f"overhead per request per step, paged, batch 512 / batch 16 ({per[i512]:.1f} / {per[i16]:.1f} us)",
                 per[i512] / per[i16], "flat: <= 1.2", per[i512] / per[i16] <= 1.2, None))
    return rows


def main() -> None:
    print_summary(summary_rows(run(parse(bench_parser(__doc__)).quick)))


if __name__ == "__main__":
    main()

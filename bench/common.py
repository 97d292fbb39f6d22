"""Shared pieces of the benchmarks: model presets, workloads, timed runs, repeats, results.

Every benchmark in bench/ measures ratios side by side in one process: the runs being
compared are interleaved (A B, then B A, ...) and repeated, and each ratio is the median of
the per-repeat ratios. The machine these numbers come from is small and shared, so a single
run can be several times slower than the next one; pairing the runs is what keeps the
ratios meaningful.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pagedllama.app.capacity import find_max_batch  # noqa: E402
from pagedllama.app.workload import build_requests  # noqa: E402
from pagedllama.engine.budget import cache_layout, cpu_default_budget  # noqa: E402
from pagedllama.engine.config import CacheLayout, EngineConfig  # noqa: E402
from pagedllama.engine.engine import Engine, build_engine  # noqa: E402
from pagedllama.engine.sequence import Request  # noqa: E402
from pagedllama.host_memory import keep_freed_memory  # noqa: E402
from pagedllama.io.checkpoint import build_model, random_state_dict  # noqa: E402
from pagedllama.io.data import default_data_path, load_sharegpt  # noqa: E402
from pagedllama.io.tokenizer import demo_tokenizer  # noqa: E402
from pagedllama.model.config import DEMO_ARGS, DEMO_MAX_SEQ_LEN, ModelArgs, ffn_hidden_dim  # noqa: E402
from pagedllama.model.model import Transformer  # noqa: E402


# Intra-op threads. 1 by default: on a shared 2-core machine, two OpenMP threads stall at every
# parallel region while another tenant holds the second core (measured here: the same 6-request
# run took 0.9-1.3 s with 1 thread and 18-23 s with 2, alternating in one process). Set
# BENCH_THREADS=2 (or --threads 2) on a quiet machine.
DEFAULT_THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def set_threads(n: int | None = None) -> int:
    n = n or DEFAULT_THREADS
    torch.set_num_threads(n)
    return n


set_threads()


def bench_parser(description: str, quick_help: str | None = None, repeats: bool = False,
                 quick: bool = True) -> argparse.ArgumentParser:
    """A benchmark script's command line, with the flags they share: --quick, --repeats, --threads."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if quick:
        ap.add_argument("--quick", action="store_true", help=quick_help)
    if repeats:
        ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1 or $BENCH_THREADS)")
    return ap


def parse(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed flags, with torch's threads set from --threads."""
    a = ap.parse_args()
    set_threads(a.threads)
    return a


def print_summary(rows: list[tuple]) -> None:
    """Summary rows (name, value, target, met, wall-clock value or None), one a line."""
    for name, value, target, ok, wall in rows:
        wall = "" if wall is None else f" (wall {wall:.2f})"
        print(f"{name:<100} {value:7.2f}{wall}  target {target:<12} {'ok' if ok else 'MISSED'}")


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """Git revision `rev` checked out in a temporary worktree, removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), rev], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


CPU = torch.device("cpu")
# BENCH_DEVICE=cuda runs the throughput and Hugging Face benchmarks on a GPU (written for it, not run
# in the session that produced BENCHMARKS.md: no GPU there).
DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))


def cpu_has_amx_bf16() -> bool:
    """Intel AMX tiles (Sapphire Rapids and later): oneDNN runs bfloat16 matmuls on them, faster
    than float32 at large batches (batch_scaling.py measures by how much). Without them bf16 is
    slow on CPU."""
    try:
        return " amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# What the CLI does on CPU (pagedllama/host_memory.py); BENCH_KEEP_FREED_MEMORY=0 leaves glibc's
# defaults (measured against each other at commit a35ad5d: BENCHMARKS.md's changelog).
if DEVICE.type == "cpu" and os.environ.get("BENCH_KEEP_FREED_MEMORY", "1") == "1":
    keep_freed_memory()

# bfloat16 (Llama 3's own dtype) on CUDA and on CPUs with AMX, else float32; BENCH_DTYPE overrides.
DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
    os.environ.get("BENCH_DTYPE", "bfloat16" if DEVICE.type == "cuda" or cpu_has_amx_bf16() else "float32")]
# One folder of results per dtype, so a float32 run and a bfloat16 run stand side by side.
RESULTS = ROOT / "bench" / "results" / str(DTYPE).removeprefix("torch.")
BLOCK_SIZE = 16  # the paged twin's default

# ---------------------------------------------------------------------------------------------
# Models

# ~100M parameters in Llama 3's shape: GQA (12 query heads over 4 KV heads, head_dim 64), SwiGLU
# with Meta's FFN rule (multiple_of 256, ffn_dim_multiplier 1.3 as in Llama 3 8B: hidden 2816),
# RoPE theta 500000, untied output head, the demo tokenizer's 4352-token vocabulary.
BENCH_100M = ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=4352,
                       hidden_dim=ffn_hidden_dim(768, 256, 1.3), rope_theta=500000.0)
MODELS: dict[str, ModelArgs] = {"demo": DEMO_ARGS, "100m": BENCH_100M}
MAX_SEQ_LEN = DEMO_MAX_SEQ_LEN  # 4096: the context each naive row preallocates (the demo's default)

_STATE_DICTS: dict[str, dict] = {}


def state_dict(name: str) -> dict[str, torch.Tensor]:
    """Deterministic random weights (seed 0, as the demo uses), made once per process."""
    if name not in _STATE_DICTS:
        _STATE_DICTS[name] = random_state_dict(MODELS[name], seed=0)
    return _STATE_DICTS[name]


_MODELS: dict[tuple[str, torch.dtype], Transformer] = {}


def load_model(name: str, dtype: torch.dtype = DTYPE) -> Transformer:
    """The model with its random weights in `dtype`, built once per process."""
    if (name, dtype) not in _MODELS:
        _MODELS[name, dtype] = model = build_model(MODELS[name], state_dict(name), DEVICE, dtype, MAX_SEQ_LEN)
        if dtype == DTYPE:
            warm_up(model, name)
    return _MODELS[name, dtype]


def describe_model(name: str) -> str:
    a = MODELS[name]
    return (f"{name}: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads / {a.n_kv_heads} KV heads, "
            f"FFN {a.hidden_dim}, vocab {a.vocab_size}: {a.num_params() / 1e6:.1f}M parameters, "
            f"{a.kv_bytes_per_token(DTYPE.itemsize)} KV bytes/token in {str(DTYPE).removeprefix('torch.')}")


# ---------------------------------------------------------------------------------------------
# Workloads

_CONVERSATIONS = None


def sharegpt_requests(n: int | None = None, max_seq_len: int = MAX_SEQ_LEN, cap: int | None = None) -> list[Request]:
    """The shipped ShareGPT sample in file order, each generating its reference answer's length
    (demo tokenizer), optionally capped at `cap` new tokens."""
    global _CONVERSATIONS
    if _CONVERSATIONS is None:
        _CONVERSATIONS = load_sharegpt(default_data_path())[0]
    n = len(_CONVERSATIONS) if n is None else n
    reqs = build_requests(_CONVERSATIONS, demo_tokenizer(), n, max_seq_len, None, reference_lengths=True)
    if cap is not None:
        reqs = [Request(r.request_id, r.prompt_ids, min(cap, r.max_new_tokens)) for r in reqs]
    return reqs


@dataclass(frozen=True)
class RandomSpec:
    """nano-vllm's bench.py draws 256 requests with input and output lengths uniform over
    [100, 1024] and token ids uniform over [0, 10000], seed 0; here the ranges are scaled down
    for 2 CPU cores and ids stay below the demo tokenizer's 4096 ordinary tokens."""

    num_seqs: int
    min_in: int
    max_in: int
    min_out: int
    max_out: int
    seed: int = 0

    def label(self) -> str:
        return (f"random {self.num_seqs} reqs, in U[{self.min_in},{self.max_in}], "
                f"out U[{self.min_out},{self.max_out}], seed {self.seed}")


def random_requests(spec: RandomSpec) -> list[Request]:
    rng = random.Random(spec.seed)
    reqs = []
    for i in range(spec.num_seqs):
        prompt = [rng.randrange(4096) for _ in range(rng.randint(spec.min_in, spec.max_in))]
        reqs.append(Request(f"rand-{i}", prompt, rng.randint(spec.min_out, spec.max_out)))
    return reqs


def workload_stats(reqs: list[Request]) -> dict:
    p = [len(r.prompt_ids) for r in reqs]
    o = [r.max_new_tokens for r in reqs]
    return {"num_requests": len(reqs), "prompt_tokens_mean": statistics.mean(p), "prompt_tokens_max": max(p),
            "output_tokens_mean": statistics.mean(o), "output_tokens_max": max(o), "output_tokens_total": sum(o)}


# ---------------------------------------------------------------------------------------------
# Caches and runs


def bytes_per_token(model: str) -> int:
    return MODELS[model].kv_bytes_per_token(DTYPE.itemsize)


def budget_for_rows(model: str, rows: int, max_seq_len: int = MAX_SEQ_LEN) -> int:
    """A KV budget of exactly `rows` naive preallocations: both twins get this many bytes."""
    return rows * max_seq_len * bytes_per_token(model)


def default_budget(model: str, max_seq_len: int = MAX_SEQ_LEN) -> int:
    """The CLI's CPU default: as many max_seq_len rows as Llama 3 8B gets on a 24 GB GPU (6.19)."""
    return cpu_default_budget(bytes_per_token(model), max_seq_len).kv_bytes


def default_backend(max_seq_len: int):
    """BENCH_ATTENTION (torch, flex, ...; default auto: the CLI's choice for a model of unstated
    size, so torch on CPU), one kernel for the naive rows of `max_seq_len` and the paged blocks alike."""
    from pagedllama.model.backends import select_backend

    name = os.environ.get("BENCH_ATTENTION", "auto")
    select_backend(name, DEVICE, DTYPE, max_seq_len, BLOCK_SIZE)  # the naive twin's rows allow it too
    return select_backend(name, DEVICE, DTYPE, BLOCK_SIZE, max_seq_len)


def bench_config(twin: str, model: str, max_seq_len: int = MAX_SEQ_LEN, dtype: torch.dtype = DTYPE,
                 **options) -> EngineConfig:
    """What the benchmarks run: greedy, EOS ignored, every request to its length (as the demo runs)."""
    return EngineConfig(twin, MODELS[model], max_seq_len, dtype, DEVICE, BLOCK_SIZE, ignore_eos=True, **options)


@dataclass
class CachePlan:
    """The KV cache a run gets, for `engine_steps` to build its engine with (through the CLI's own
    `build_engine`, unless `layout` fixes the pool and its `rows`)."""

    config: EngineConfig
    budget: int
    backend: object
    layout: CacheLayout | None = None
    rows: int = 0
    sized_for: list[Request] = field(default_factory=list)  # the requests the cache is sized for, if not the run's

    def engine(self, model: Transformer | None, reqs: list[Request], **options) -> Engine:
        """The engine for `reqs`; `options`: EngineConfig fields to change."""
        config = replace(self.config, **options)
        if self.layout is not None:
            return Engine(config, self.layout, self.rows, model, self.backend)
        return build_engine(config, self.budget, self.sized_for or reqs, model, self.backend)


def make_cache(twin: str, model: str, reqs: list[Request], budget: int, max_seq_len: int = MAX_SEQ_LEN,
               storage: bool = True, backend=None, dtype: torch.dtype = DTYPE) -> CachePlan:
    """The twin's cache for `reqs` within `budget`; `storage=False`: for a dry run (no backend)."""
    backend = backend or (default_backend(max_seq_len) if storage else None)
    return CachePlan(bench_config(twin, model, max_seq_len, dtype), budget, backend)


def naive_continuous_cache(model: str, rows: int, num_reqs: int, max_seq_len: int = MAX_SEQ_LEN) -> CachePlan:
    """Naive preallocation (one max_seq_len row per running request) but with continuous batching:
    `rows` rows, admitting a waiting request whenever one finishes. Not a twin the CLI has; it
    separates the effect of the memory layout from that of batching."""
    return CachePlan(bench_config("naive", model, max_seq_len), 0, default_backend(max_seq_len),
                     CacheLayout(max_seq_len, rows, preallocated=True), num_reqs)


@dataclass
class RunStats:
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time (all its threads)
    output_tokens: int
    steps: int
    peak_running: int
    preemptions: int
    outputs: list[list[int]]
    parts: list[RunStats] = field(default_factory=list)  # the runs `combine` made it of

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def tok_per_cpu_s(self) -> float:
        return self.output_tokens / self.cpu_seconds

    def rates(self) -> dict[str, float]:
        return {"cpu": self.tok_per_cpu_s, "wall": self.tok_per_s}


class Clock:
    """Wall and process CPU time of a block. With one intra-op thread the process CPU time is the
    time the work itself took: it does not count the time another tenant held the core. On CUDA
    the CPU time says nothing about the GPU's work, so both figures are the synchronized wall time."""

    def __enter__(self):
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        if DEVICE.type == "cuda":
            self.cpu = self.wall


# An engine run as a generator: it yields each step (a callable) for `lockstep` to run and time,
# is sent back that step's (CPU, wall) seconds, and returns its RunStats.
StepRun = Generator[Callable[[], object], tuple[float, float], RunStats]


def engine_steps(model: Transformer | None, cache: CachePlan, reqs: list[Request]) -> StepRun:
    """Generate every request to its length (greedy, EOS ignored, as the demo runs), one step at a
    time; only the steps are timed."""
    engine = cache.engine(model, reqs)
    groups = engine.add(reqs)
    cpu = wall = 0.0
    steps = 0
    while not engine.scheduler.done:
        step_cpu, step_wall = yield engine.step
        cpu, wall, steps = cpu + step_cpu, wall + step_wall, steps + 1
    outs = [s.output_ids for g in groups for s in g.outputs()]
    st = engine.scheduler.stats
    return RunStats(wall, cpu, sum(len(o) for o in outs), steps, st.peak_running, st.preemptions, outs)


def naive_waves(model: Transformer, model_name: str, reqs: list[Request], wave: int, budget: int,
                max_seq_len: int = MAX_SEQ_LEN, backend_cls=None) -> StepRun:
    """The naive twin serving more requests than its largest batch: consecutive static batches of
    `wave` requests, each with its own preallocated cache (as running llama3-naive.py repeatedly)."""
    runs = []
    for i in range(0, len(reqs), wave):
        cache = make_cache("naive", model_name, reqs[i:i + wave], budget, max_seq_len,
                           backend=backend_cls() if backend_cls else None)
        runs.append((yield from engine_steps(model, cache, reqs[i:i + wave])))
    return combine(runs)


def lockstep(runs: dict[str, StepRun]) -> dict[str, RunStats]:
    """Advance several runs one step each in turn until all are done, timing every step.

    This machine's speed drifts by tens of percent over minutes; runs taking turns step by
    step see the same drift while they overlap (a run that outlasts the others ends alone).
    """
    pending = {name: (run, next(run)) for name, run in runs.items()}
    done = {}
    while pending:
        for name, (run, step) in list(pending.items()):
            with Clock() as c:
                step()
            try:
                pending[name] = (run, run.send((c.cpu, c.wall)))
            except StopIteration as stop:
                done[name] = stop.value
                del pending[name]
    return done


def run_engine(model: Transformer | None, cache: CachePlan, reqs: list[Request]) -> RunStats:
    """One engine run by itself."""
    return lockstep({"run": engine_steps(model, cache, reqs)})["run"]


def combine(runs: list[RunStats]) -> RunStats:
    return RunStats(sum(r.seconds for r in runs), sum(r.cpu_seconds for r in runs),
                    sum(r.output_tokens for r in runs), sum(r.steps for r in runs),
                    max(r.peak_running for r in runs), sum(r.preemptions for r in runs),
                    [o for r in runs for o in r.outputs], runs)


def paged_max_batch(model: str, reqs: list[Request], budget: int, max_seq_len: int = MAX_SEQ_LEN) -> tuple[int, bool]:
    """The dry run's answer: largest K whose first K requests fit the KV memory (none waits for blocks, none is preempted)."""
    return find_max_batch(bench_config("paged", model, max_seq_len), budget, reqs)


def naive_max_batch(model: str, budget: int, max_seq_len: int = MAX_SEQ_LEN) -> int:
    return cache_layout(bench_config("naive", model, max_seq_len), budget).num_blocks


# ---------------------------------------------------------------------------------------------
# Repeats


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired(fns: dict[str, Callable[[], dict[str, float]]], repeats: int,
           log: Callable[[str], None] = print) -> dict[str, dict[str, list[float]]]:
    """Run each measurement `repeats` times, interleaved, reversing the order every repeat
    (A B C, C B A, ...) so slow drifts in machine load hit all of them alike. Each returns
    {"cpu": rate, "wall": rate}; the result is {name: {"cpu": [...], "wall": [...]}}."""
    names = list(fns)
    out: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "wall": []} for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            for k, v in fns[n]().items():
                out[n][k].append(v)
        log("    repeat %d (tok per CPU-s / per wall-s): %s" % (
            r + 1, ", ".join(f"{n} {out[n]['cpu'][-1]:.1f} / {out[n]['wall'][-1]:.1f}" for n in names)))
    return out


def lockstep_repeats(runs: dict[str, Callable[[], StepRun]], repeats: int, log: Callable[[str], None] = print
                     ) -> tuple[dict[str, dict[str, list[float]]], list[dict[str, RunStats]]]:
    """`repeats` rounds of `lockstep` over fresh runs, the order reversed every round. Returns
    {name: {"cpu": [rate per round], "wall": [...]}} (as `paired`) and each round's RunStats."""
    names = list(runs)
    out: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "wall": []} for n in names}
    rounds = []
    for r in range(repeats):
        stats = lockstep({n: runs[n]() for n in (names if r % 2 == 0 else names[::-1])})
        for n in names:
            for k, v in stats[n].rates().items():
                out[n][k].append(v)
        rounds.append(stats)
        log("    repeat %d, in lockstep (tok per CPU-s / per wall-s): %s" % (
            r + 1, ", ".join(f"{n} {out[n]['cpu'][-1]:.1f} / {out[n]['wall'][-1]:.1f}" for n in names)))
    return out, rounds


def ratio_summary(num: list[float], den: list[float]) -> dict:
    """Median of the per-repeat ratios (paired), with their spread and the ratio of medians."""
    ratios = [a / b for a, b in zip(num, den)]
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios), "per_repeat": ratios,
            "ratio_of_medians": median(num) / median(den)}


def ratios(tps: dict, a: str, b: str) -> dict:
    """a over b on CPU time (the primary figure) and on wall time."""
    return {**ratio_summary(tps[a]["cpu"], tps[b]["cpu"]), "wall": ratio_summary(tps[a]["wall"], tps[b]["wall"])}


# ---------------------------------------------------------------------------------------------
# Results


def _git(*args: str) -> str:
    import subprocess

    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# The code a run measures is the code it imported: taken when the run starts, not when it saves.
_START_COMMIT = _git("rev-parse", "--short", "HEAD")
_START_MODIFIED = _git("status", "--porcelain", "--", "pagedllama").splitlines()


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(DEVICE), "gpu": gpu, "dtype": str(DTYPE).removeprefix("torch."),
            "amx_bf16": cpu_has_amx_bf16(), "git_commit": _START_COMMIT, "package_files_modified": _START_MODIFIED,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "loadavg": list(os.getloadavg())}


def save_json(name: str, doc: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **doc}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, name: str) -> Path:
    """`fig` laid out and written to the results folder as NAME.png, then closed."""
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def warm_up(model: Transformer, model_name: str) -> None:
    """One short untimed run: first calls pay for oneDNN / allocator set-up."""
    reqs = [Request("warm", list(range(1, 40)), 8), Request("warm2", list(range(1, 20)), 4)]
    run_engine(model, make_cache("paged", model_name, reqs, budget_for_rows(model_name, 2)), reqs)

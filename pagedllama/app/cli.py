"""The command line both twins share: `llama3-naive.py` and `llama3-paged.py` call `main`.

The twins differ in one thing, how their KV pool is cut (`budget.cache_layout`): the naive twin
reserves one `max_seq_len` row per request up front, the paged twin a pool of small blocks
handed out on demand. This file turns the flags into one `EngineConfig` (`prepare`), runs the
engine or the dry run, and prints the report.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..args import ArgumentParser, positive_int
from ..engine.budget import (DEFAULT_GPU_MEMORY_UTILIZATION, Budget, cache_layout, cpu_default_budget, per_rank_budget,
                             cuda_default_budget, simulated_budget, user_budget)
from ..engine.config import PAGED_BLOCK_SIZE, PREEMPTION_MODES, TWINS, EngineConfig
from ..engine.reservation import RESERVE_POLICIES
from ..engine.engine import Engine, build_engine
from ..engine.sampling import SamplingParams
from ..engine.scheduler import SchedulerStats
from ..engine.sequence import Request, Sequence
from ..engine.sharing import format_sharing
from ..errors import OutOfKVMemory, UsageError, UserError
from ..host_memory import keep_freed_memory
from ..io.checkpoint import read_config
from ..io.gguf_checkpoint import gguf_file, gguf_tokenizer, read_gguf_config
from ..io.data import default_data_path, load_sharegpt
from ..io.loading import (DEMO, LLAMA3_VOCAB_SIZE, LLAMA_MODELS_INSTALL, Loaded, installed_llama3_tokenizer, load,
                          resolve_device)
from ..io.tokenizer import demo_tokenizer, load_tokenizer
from ..model.attention import AttentionBackend
from ..model.backends import BACKENDS, select_backend
from ..model.config import (CONFIG_FILES, DEFAULT_MAX_SEQ_LEN, DEMO_ARGS, MAX_SEQ_LEN_LIMIT, NAMED_SHAPES, ModelArgs,
                            resolve_shape)
from ..model.model_runner import warmup_peak_bytes
from ..model.parallel import SINGLE, TensorParallel, check_divides
from ..units import GB, human_bytes
from .capacity import dry_run, find_max_batch
from .dtype_choice import DtypeChoice, resolve_dtype
from .launch import DEFAULT_TIMEOUT_S, check_torchrun_world, run_ranks, under_torchrun
from .report import format_memory_report, timeline_json
from .threads import choose_threads
from .waste import format_waste_report, system_name, waste_json
from .workload import build_requests

DESCRIPTIONS = {"naive": "naive (contiguous max_seq_len preallocation per request)",
                "paged": "paged (blocks allocated on demand)"}



def build_parser(twin: str) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=f"llama3-{twin}.py",
                       description=f"Batched Llama 3 generation over ShareGPT prompts with a {DESCRIPTIONS[twin]} "
                                   "KV cache, ending with a memory report.")
    p.add_argument("batch_size", type=positive_int, metavar="BATCH_SIZE", nargs="?",
                   help="number of ShareGPT prompts to run at once (optional with --find-max-batch)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEMO, help="checkpoint directory (Meta or Hugging Face format), a Llama "
                                                 "GGUF file, or 'demo' for the built-in random-weight model (default)")
    g.add_argument("--tokenizer", help="tokenizer.model (tiktoken) or tokenizer.json; default: found in --model")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    g.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for PyTorch's ops (default: one per core idle at start, so a core another "
                        "process keeps busy does not stall every op; OMP_NUM_THREADS is respected)")
    g.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (auto: bfloat16 on GPU; "
                   "on CPU bfloat16 only where the CPU has AMX and a matmul of the model's shape timed at "
                   "BATCH_SIZE runs faster in it than in float32, else float32; the startup lines say why)")
    g.add_argument("--attention", default="auto", help=f"attention backend: {', '.join(BACKENDS)} (default auto: "
                                                       "one that both twins' block sizes allow: flash-attn, else "
                                                       "triton on CUDA; on CPU flex for models of 100M parameters "
                                                       "and up where g++ can compile it, else torch)")
    g.add_argument("--cuda-graphs", action="store_true", help="decode steps replay CUDA graphs captured per "
                   "batch size (CUDA, triton backend; not yet verified on a GPU)")
    g = p.add_argument_group("workload")
    g.add_argument("--data", type=Path, help="ShareGPT JSON file (default: the shipped sharegpt-filtered.json)")
    g.add_argument("--max-seq-len", type=positive_int,
                   help="context length per request: prompt + answer (default 8192; 4096 for the demo; "
                        f"at most {MAX_SEQ_LEN_LIMIT})")
    g.add_argument("--max-new-tokens", type=positive_int, help="cap on generated tokens per request "
                   "(default: up to the context; the demo generates each dataset answer's length)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-turn tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g = p.add_argument_group("KV memory")
    g.add_argument("--kv-cache-gb", type=float, help="KV cache budget in GB (2^30 bytes); default: GPU memory x "
                   "--gpu-memory-utilization minus weights and activations; on CPU, scaled to Llama 3 8B on 24 GB")
    g.add_argument("--gpu-memory-utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION,
                   help=f"fraction of GPU memory to use (default {DEFAULT_GPU_MEMORY_UTILIZATION})")
    g.add_argument("--reserve", metavar="POLICY", help="naive twin: how many slots a request reserves at admission "
                   "(the vLLM paper's Orca baselines): max = max_seq_len (default, one row per request), pow2 = "
                   "prompt + the answer length rounded up to a power of two, oracle = prompt + answer - 1 (the slots "
                   "it writes); pow2 and oracle take runs of 16-slot blocks from one region, first fit")
    g.add_argument("--oracle-lengths", type=Path, metavar="PATH", help="with --reserve pow2 | oracle and a model that "
                   "stops by itself: the true answer lengths, from a previous run's --json")
    if twin == "paged":
        g.add_argument("--block-size", type=positive_int, default=PAGED_BLOCK_SIZE,
                       help=f"KV slots per block (default {PAGED_BLOCK_SIZE})")
        g.add_argument("--num-blocks", type=positive_int, help="pool size in blocks (default: the KV budget)")
    else:  # read for the other twin's sake (`--attention auto` suits both), and to keep one EngineConfig
        p.set_defaults(block_size=PAGED_BLOCK_SIZE, num_blocks=None, enable_prefix_caching=False)
    g = p.add_argument_group("sharing and preemption")
    g.add_argument("--n", type=positive_int, default=1, help="parallel samples per request; they share the "
                   "prompt's KV blocks (default 1)")
    g.add_argument("--beam-width", type=positive_int, default=1, help="beam search with this many beams, which "
                   "share blocks (default 1: no beam search)")
    g.add_argument("--system-prompt", metavar="TEXT", help="a system message before every prompt: a shared prefix")
    if twin == "paged":
        g.add_argument("--enable-prefix-caching", action="store_true",
                       help="reuse the K/V of full blocks whose prefix was computed before")
    g.add_argument("--preemption", choices=PREEMPTION_MODES, default="recompute",
                   help="when the pool runs out: recompute the preempted request later, or swap its K/V to CPU "
                        "memory (default recompute)")
    g.add_argument("--swap-space-gb", type=float, default=4.0, help="CPU memory for --preemption swap (default 4)")
    g = p.add_argument_group("capacity planning (no forward pass: the real scheduler and allocator only)")
    g.add_argument("--find-max-batch", action="store_true",
                   help="print the largest batch that fits in the KV budget: no request waits for blocks "
                        "and none is preempted (dry runs)")
    g.add_argument("--simulate", metavar="CONFIG",
                   help=f"plan for a model that is not here: {', '.join(NAMED_SHAPES)}, a params.json / "
                        "config.json, or a GGUF (its metadata only)")
    g.add_argument("--gpu-memory-gb", type=float, help="with --simulate: the GPU's memory in GB")
    g = p.add_argument_group("tensor parallelism (docs/tensor-parallel.md)")
    g.add_argument("--tensor-parallel-size", type=positive_int, default=1, metavar="N",
                   help="split weights and KV heads across N GPUs (N processes, NCCL; gloo on CPU), spawned "
                        "here or started by torchrun; with --simulate: plan for N GPUs of --gpu-memory-gb each "
                        "(default 1)")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"seconds a rank waits for the others before the run is stopped (default {DEFAULT_TIMEOUT_S:g})")
    g = p.add_argument_group("output")
    g.add_argument("--json", type=Path, help="write answers and the report as one JSON object")
    g.add_argument("--output", type=Path, help="stream each finished request as a JSON line the moment it ends")
    g.add_argument("--answers", action=argparse.BooleanOptionalAction,
                   help="print the generated answers (default: yes for a real model, as the original scripts do; "
                        "no for the demo, whose random weights write gibberish)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def main(twin: str, argv: list[str] | None = None) -> int:
    args = build_parser(twin).parse_args(argv)
    return run_reporting_errors(lambda: one_or_many_ranks(args, run_rank, twin), args.debug)


def one_or_many_ranks(args: argparse.Namespace, rank_main: Callable[..., int], *rank_args) -> int:
    """`rank_main(tp, *rank_args, args)` in this process, or on --tensor-parallel-size ranks when the
    run computes (plans and dry runs need no ranks)."""
    check_torchrun_world(args.tensor_parallel_size)
    if args.tensor_parallel_size > 1 and not (args.simulate or getattr(args, "dry_run", False)):
        return run_tensor_parallel(args, rank_main, *rank_args)
    return rank_main(SINGLE, *rank_args, args)


def run_tensor_parallel(args: argparse.Namespace, rank_main: Callable[..., int], *rank_args) -> int:
    """`rank_main(tp, *rank_args, args)` on --tensor-parallel-size ranks (app/launch.py), after the
    checks that need no rank (one line each)."""
    size = args.tensor_parallel_size
    device = resolve_device(args.device)
    if args.dist_timeout <= 0:
        raise UsageError(f"--dist-timeout {args.dist_timeout} must be a positive number of seconds")
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", size)) if under_torchrun() else size
        if per_node > visible:
            raise UsageError(f"--tensor-parallel-size {size} needs {per_node} GPUs on this machine but {visible} "
                             "are visible; lower it, or spread the ranks over machines with torchrun")
    check_divides(DEMO_ARGS if args.model == DEMO else read_config(args.model), size)
    return run_ranks(size, device.type, args.dist_timeout, rank_main, (*rank_args, args), describe_error)


def silent_rank(args: argparse.Namespace, tp: TensorParallel) -> argparse.Namespace:
    """The flags for rank `tp.rank`: rank 0 prints and writes the files; the others compute in silence."""
    if tp.rank == 0:
        return args
    return argparse.Namespace(**{**vars(args), "json": None, "output": None, "no_progress": True, "answers": False,
                                 "no_plots": True})


def run_rank(tp: TensorParallel, twin: str, args: argparse.Namespace) -> int:
    """One rank's run of a twin."""
    return run(twin, silent_rank(args, tp), tp)


def run_reporting_errors(job: Callable[[], int], debug: bool) -> int:
    """Run `job`; any failure becomes one line on stderr (a traceback only with --debug)."""
    try:
        return job()
    except Exception as e:  # noqa: BLE001 - the user gets one line; --debug shows the rest
        if debug:
            raise
        message, status = describe_error(e)
        print(f"error: {message}", file=sys.stderr)
        return status


def describe_error(e: Exception) -> tuple[str, int]:
    """The one line a user sees for `e`, and the exit status."""
    if isinstance(e, UserError):
        return str(e), e.exit_code
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return (f"CUDA ran out of memory ({str(e).splitlines()[0]}); lower the batch size, --kv-cache-gb or "
                "--gpu-memory-utilization"), 1
    tried = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", str(e))
    if tried:  # PyTorch's CPU allocator
        return (f"out of memory: could not allocate {human_bytes(int(tried[1]))}; lower --max-seq-len, "
                "--kv-cache-gb or the batch size"), 1
    where = traceback.extract_tb(e.__traceback__)[-1]
    return (f"internal error {type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno}); "
            "rerun with --debug and report it"), 1


@dataclass
class Setup:
    """Everything a run needs, resolved from the command line once."""

    loaded: Loaded
    config: EngineConfig  # this twin's
    budget: Budget
    backend: AttentionBackend | None  # None for dry runs
    requests: list[Request]  # the batch, then the rest of the dataset when searching
    batch_size: int
    planning: bool
    header: str
    dtype_reason: str  # what --dtype gave, and why (app/dtype_choice.py)

    @property
    def batch(self) -> list[Request]:
        return self.requests[:self.batch_size]

    @property
    def device(self) -> torch.device:
        return self.config.device

    @property
    def dtype(self) -> torch.dtype:
        return self.config.dtype


def check_writable(flag: str, path: Path) -> None:
    """Fail before the run, not after it, if an output file cannot be written."""
    if not path.parent.is_dir():
        what = "is a file, not a directory" if path.parent.exists() else "does not exist"
        raise UserError(f"{flag} {path}: {path.parent} {what}; create the directory or pick another path")
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write it ({e.strerror}); pick another path") from None
    if not existed:
        path.unlink()


def prepare(twin: str, args: argparse.Namespace, whole_dataset: bool = False, tp: TensorParallel = SINGLE) -> Setup:
    """Resolve the flags; `whole_dataset` tokenizes every conversation (for max-batch searches);
    `tp`: this process is one of several tensor-parallel ranks."""
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.batch_size is None and not args.find_max_batch:
        raise UsageError("give BATCH_SIZE, the number of prompts to run (or --find-max-batch)")
    if args.max_seq_len and args.max_seq_len > MAX_SEQ_LEN_LIMIT:
        raise UsageError(f"--max-seq-len {args.max_seq_len} is beyond what this engine supports: give at most "
                         f"{MAX_SEQ_LEN_LIMIT} (Llama 3.1 is trained to 131072)")
    if args.gpu_memory_gb is not None and not args.simulate:
        raise UsageError("--gpu-memory-gb only applies with --simulate CONFIG")
    check_reserve(twin, args)
    for flag, path in (("--output", args.output), ("--json", args.json)):
        if path:
            check_writable(flag, path)
    planning = bool(args.simulate or args.find_max_batch)
    if args.n > 1 and args.beam_width > 1:
        raise UsageError("--n and --beam-width exclude each other")
    if args.swap_space_gb < 0:
        raise UsageError(f"--swap-space-gb {args.swap_space_gb} must be at least 0")
    if planning and (args.n > 1 or args.beam_width > 1 or args.preemption == "swap" or args.enable_prefix_caching):
        raise UsageError("--n, --beam-width, --preemption swap and --enable-prefix-caching apply to generation, "
                         "not to --simulate or --find-max-batch")
    device = resolve_device("cpu" if args.simulate else args.device)
    if device.type == "cuda" and tp.size > 1:
        device = torch.device("cuda", torch.cuda.current_device())  # launch.py set this rank's GPU
    if args.cuda_graphs and (device.type != "cuda" or args.attention not in ("auto", "triton")):
        raise UsageError("--cuda-graphs needs a CUDA GPU and the triton attention backend; drop it, or run on "
                         "CUDA with --attention triton")
    if device.type == "cpu":
        keep_freed_memory()  # prefill activations reused, not faulted in again each step (host_memory.py)
    # Dry runs compute nothing: no need to watch the cores for them. Chosen before the dtype, whose
    # measurement runs on these threads.
    threads = f"; threads: {choose_threads(args.threads)}" if not planning or args.threads else ""
    choice = run_dtype(args, device, tp)
    dtype = choice.dtype
    data_path = args.data or default_data_path()
    conversations, skipped = load_sharegpt(data_path)
    loaded = (shape_only(args) if args.simulate
              else load(args.model, args.tokenizer, device, dtype, args.max_seq_len, tp))
    config = engine_config(twin, args, loaded, device, dtype, tp)
    block = cache_layout(config, 0).block_size  # a budget of 0: only the block size is wanted
    if block > loaded.max_seq_len:
        raise UsageError(f"--block-size {block} is larger than --max-seq-len {loaded.max_seq_len}; "
                         f"use a --block-size of at most {loaded.max_seq_len} or raise --max-seq-len")
    whole_dataset = whole_dataset or args.find_max_batch
    count = max(len(conversations) if whole_dataset else 0, args.batch_size or 0)
    # Searches follow the dataset's answer lengths, as the demo does: real models stop at EOS.
    requests = build_requests(conversations, loaded.tokenizer, count, loaded.max_seq_len, args.max_new_tokens,
                              reference_lengths=loaded.is_demo or whole_dataset or planning,
                              system_prompt=args.system_prompt)
    if args.oracle_lengths:
        requests = with_oracle_lengths(requests, args.oracle_lengths)
    requests = [replace(r, n=args.n, beam_width=args.beam_width) for r in requests]
    other = replace(config, twin=next(t for t in TWINS if t != twin))
    backend = None if planning else select_backend(args.attention, device, dtype, block,
                                                   cache_layout(other, 0).block_size, loaded.args.num_params())
    if args.cuda_graphs and backend and backend.name != "triton":
        raise UsageError(f"--cuda-graphs captures the triton backend, not {backend.name}; add --attention triton")
    budget = resolve_budget(args, loaded, config, backend, block)
    header = (f"{args.batch_size or 0} requests from {data_path} ({len(conversations)} usable conversations, "
              f"{skipped} skipped: no usable human turn)\n"
              f"model: {loaded.description}; {device.type}, {choice.reason}{threads}\n"
              f"KV budget: {human_bytes(budget.kv_bytes)} ({budget.explanation})")
    return Setup(loaded, config, budget, backend, requests, args.batch_size or 0, planning, header, choice.reason)


def run_dtype(args: argparse.Namespace, device: torch.device, tp: TensorParallel = SINGLE) -> DtypeChoice:
    """--dtype for this run, before the weights load. `auto` with --simulate plans for a GPU's bfloat16;
    on CPU it times a matmul at BATCH_SIZE (batch 1 for --find-max-batch without one): `compare`
    prepares once, so both twins run the dtype chosen at the batch they share."""
    if args.simulate and args.dtype == "auto":
        return DtypeChoice(torch.bfloat16, "bfloat16 (auto: --simulate plans for a GPU)")
    return resolve_dtype(args.dtype, device, lambda: DEMO_ARGS if args.model == DEMO else read_config(args.model),
                         args.batch_size or 1, tp)


def engine_config(twin: str, args: argparse.Namespace, loaded: Loaded, device: torch.device,
                  dtype: torch.dtype, tp: TensorParallel = SINGLE) -> EngineConfig:
    """The one EngineConfig a run is built from, out of the flags and the loaded model."""
    return EngineConfig(twin, loaded.args, loaded.max_seq_len, dtype, device, block_size=args.block_size,
                        num_blocks=args.num_blocks, preemption=args.preemption,
                        swap_space_bytes=int(args.swap_space_gb * GB), prefix_caching=args.enable_prefix_caching,
                        cuda_graphs=args.cuda_graphs, sampling=SamplingParams(args.temperature, args.top_p, args.seed),
                        stop_ids=loaded.tokenizer.stop_ids, ignore_eos=args.ignore_eos or loaded.is_demo,
                        reserve=args.reserve or "max", tensor_parallel=tp)


def check_reserve(twin: str, args: argparse.Namespace) -> None:
    """--reserve is the naive twin's, one sequence per request; --oracle-lengths goes with pow2 or oracle."""
    if args.reserve is None:
        if args.oracle_lengths:
            raise UsageError("--oracle-lengths gives the answer lengths that --reserve pow2 or oracle reserve for; "
                             "add one of them (naive twin)")
        return
    if twin == "paged":
        raise UsageError("--reserve applies to the naive twin (llama3-naive.py): the paged twin reserves blocks as "
                         "requests grow; drop --reserve (python -m pagedllama.compare shows all policies)")
    if args.reserve not in RESERVE_POLICIES:
        raise UsageError(f"--reserve {args.reserve}: unknown policy; use one of: {', '.join(RESERVE_POLICIES)}")
    if args.reserve == "max" and args.oracle_lengths:
        raise UsageError("--oracle-lengths applies with --reserve pow2 or oracle, not max")
    if args.oracle_lengths and (args.simulate or args.find_max_batch):
        raise UsageError("--oracle-lengths applies to generation: dry runs (--simulate, --find-max-batch) generate "
                         "each dataset answer's length, which pow2 and oracle know; drop it")
    if args.reserve != "max" and (args.n > 1 or args.beam_width > 1):
        raise UsageError(f"--reserve {args.reserve} reserves one contiguous run per request; drop --n and "
                         "--beam-width, or use --reserve max")


def with_oracle_lengths(requests: list[Request], path: Path) -> list[Request]:
    """Each request with its true answer length, as a previous run's --json recorded it."""
    try:
        runs = json.loads(path.read_text())["requests"]
        lengths = {}
        for r in runs:
            lengths.setdefault(str(r["id"]), len(r["output_token_ids"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--oracle-lengths {path}: not a run's --json with requests[].output_token_ids "
                        f"({type(e).__name__}: {e}); write one with --json PATH") from None
    missing = [r.request_id for r in requests if r.request_id not in lengths]
    if missing:
        raise UserError(f"--oracle-lengths {path} has no answer for request {missing[0]} ({len(missing)} missing); "
                        "give the --json of a run over the same requests")
    return [replace(r, output_len=lengths[r.request_id]) for r in requests]


def run(twin: str, args: argparse.Namespace, tp: TensorParallel = SINGLE) -> int:
    setup = prepare(twin, args, tp=tp)
    loaded, config, budget, backend = setup.loaded, setup.config, setup.budget, setup.backend
    dtype = config.dtype
    mode = "dry run, no forward pass" if setup.planning else "generation"
    print(f"llama3-{twin}.py ({mode}): {setup.header}")
    print(f"KV cache: {DESCRIPTIONS[twin]}" + (f"; attention backend: {backend.name}" if backend else "")
          + ("; decode steps replay CUDA graphs" if args.cuda_graphs and backend else ""))
    print(capacity_line(config, budget.kv_bytes, args.tensor_parallel_size))
    doc: dict = {"twin": twin, "model": args.simulate or args.model, "planning": setup.planning,
                 "device": setup.device.type, "dtype": str(dtype).removeprefix("torch."),
                 "dtype_reason": setup.dtype_reason,
                 "attention": backend.name if backend else None, "threads": torch.get_num_threads(),
                 "max_seq_len": loaded.max_seq_len,
                 "kv_budget_bytes": budget.kv_bytes}
    if config.tensor_parallel.size > 1:  # budgets and pools count all ranks; each holds 1/N of every block
        doc.update(tensor_parallel_size=args.tensor_parallel_size,
                   kv_budget_bytes_per_rank=budget.kv_bytes // args.tensor_parallel_size)
    status = 0
    if setup.batch and setup.planning:
        run_ = dry_run(config, budget.kv_bytes, setup.batch)
        if run_.error:
            raise OutOfKVMemory(run_.error)
        print()
        print(format_memory_report(run_.memory, f"KV memory report (dry run): {DESCRIPTIONS[twin]}, "
                                                f"{setup.batch_size} requests", ranks=args.tensor_parallel_size))
        print(scheduler_line(run_.stats))
        print(format_waste_report(config, run_.waste))
        doc.update(batch_size=setup.batch_size, memory=run_.memory, scheduler=scheduler_json(run_.stats),
                   timeline=timeline_json(run_.timeline, run_.memory["bytes_per_token"]),
                   waste=waste_json(config, run_.waste))
    elif setup.batch:
        engine = build_engine(config, budget.kv_bytes, setup.batch, loaded.model, backend)
        result = generate(args, loaded, engine, setup.batch, budget.kv_bytes)
        result["timeline"] = timeline_json(result["timeline"], config.bytes_per_slot)
        print()
        print(format_memory_report(result["memory"], f"KV memory report: {DESCRIPTIONS[twin]}, {setup.batch_size} requests",
                                   interrupted=result["interrupted"], ranks=args.tensor_parallel_size))
        print(f"  run: {result['steps']} steps, {result['output_tokens']} tokens generated in "
              f"{result['elapsed_s']:.1f} s ({result['output_tokens_per_s']:.1f} tok/s)")
        print(scheduler_line(result["stats"]))
        if args.n > 1 or args.beam_width > 1 or result["prefix_cache"]:
            print(format_sharing(result["sharing"]))
        if result["prefix_cache"]:
            pc = result["prefix_cache"]
            print(f"  prefix cache: hit rate {100 * pc['hit_rate']:.1f}% ({pc['cached_tokens']} of {pc['prompt_tokens']} "
                  "prompt tokens found in the cache, not prefilled again)")
        print(format_waste_report(config, result["waste"]))
        result["scheduler"] = scheduler_json(result.pop("stats"))
        result["waste"] = waste_json(config, result["waste"])
        doc.update(result)
        status = 130 if result["interrupted"] else 0
    if args.find_max_batch:
        k, exhausted = find_max_batch(config, budget.kv_bytes, setup.requests)
        name = system_name(config)
        print(f"\nlargest batch that fits in KV memory ({name}): {k}"
              + (f" or more (all {k} usable conversations fit; give a larger --data)" if exhausted else ""))
        doc["max_batch"] = {name: k}
        doc["max_batch_exhausted_dataset"] = exhausted
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return status


def generate(args: argparse.Namespace, loaded: Loaded, engine: Engine, requests: list[Request],
             budget_bytes: int) -> dict:
    """A real run: generate and print the answers; returns the figures for the report and --json."""
    stream = args.output.open("w") if args.output else None
    on_finish = (lambda seq: _write_line(stream, seq, loaded)) if stream else None
    start = time.perf_counter()
    try:
        result = engine.run(requests, progress=not args.no_progress, on_finish=on_finish)
    finally:
        if stream:
            stream.close()
    elapsed = time.perf_counter() - start
    finished = [s for s in result.sequences if s.finish_reason]
    if args.answers if args.answers is not None else not loaded.is_demo:
        for seq in finished:
            which = "".join(f", {k.replace('_', ' ')} {v}" for k, v in _output_index(seq).items()
                            if k != "cumulative_logprob")
            print(f"\n{'=' * 30} request {seq.request_id}{which}: {seq.num_prompt_tokens} prompt tokens, "
                  f"{seq.num_output_tokens} generated ({seq.finish_reason}) {'=' * 30}")
            print(answer_text(seq, loaded))
        print("=" * 80)
    if result.interrupted:
        print(f"\ninterrupted after {result.steps} steps: {len(finished)} of {len(requests)} requests finished; "
              "the report covers the run so far")
    out_tokens = sum(s.num_output_tokens for s in result.sequences)
    memory = engine.memory.summary(budget_bytes)
    prefix_cache = engine.block_manager.prefix_cache
    return {"batch_size": len(requests), "interrupted": result.interrupted, "steps": result.steps,
            "elapsed_s": elapsed, "output_tokens": out_tokens,
            "output_tokens_per_s": out_tokens / elapsed if elapsed else 0.0,
            "requests": [_answer(s, loaded) for s in finished],
            "memory": memory, "sharing": engine.sharing.summary(memory, args.n, args.beam_width, prefix_cache is not None),
            "prefix_cache": prefix_cache.summary() if prefix_cache else None,
            "stats": engine.scheduler.stats, "timeline": engine.memory.timeline, "waste": engine.waste}


def capacity_line(config: EngineConfig, budget_bytes: int, tensor_parallel_size: int = 1) -> str:
    layout, max_seq_len = cache_layout(config, budget_bytes), config.max_seq_len
    per_rank = ""
    if tensor_parallel_size > 1:
        heads = config.model_args.n_kv_heads // tensor_parallel_size
        per_rank = (f"; per rank: {human_bytes(layout.capacity_tokens * config.bytes_per_slot // tensor_parallel_size)}"
                    f" ({heads} of the {config.model_args.n_kv_heads} KV heads of every block)")
    what = (f"{layout.num_blocks} rows of {layout.block_size} slots" if layout.preallocated
            else f"{layout.num_blocks} blocks of {layout.block_size}")
    tokens = layout.capacity_tokens
    return (f"KV capacity: {tokens} tokens ({what}); maximum concurrency for {max_seq_len}-token requests: "
            f"{tokens / max_seq_len:.2f}x{per_rank}")


def scheduler_line(stats: SchedulerStats) -> str:
    return (f"  scheduler: peak running {stats.peak_running} of {stats.num_requests} requests; waited for memory "
            f"{stats.waited_for_memory}, preempted {stats.preemptions}"
            + (f" ({stats.swaps} swapped, {stats.swap_fallbacks} recomputed: CPU pool full)"
               if stats.swaps or stats.swap_fallbacks else "")
            + f"; fits in memory: {'yes' if stats.fits_in_memory else 'no'}")


def scheduler_json(stats: SchedulerStats) -> dict:
    return {"peak_running": stats.peak_running, "waited_for_memory": stats.waited_for_memory,
            "preemptions": stats.preemptions, "fits_in_memory": stats.fits_in_memory, "swaps": stats.swaps,
            "swap_fallbacks": stats.swap_fallbacks}


def shape_only(args: argparse.Namespace) -> Loaded:
    """--simulate: a model shape with no weights, and the tokenizer that measures prompts and answers:
    --tokenizer, else a GGUF's own, else Llama 3's where `llama-models` is installed, else the demo's."""
    shape, gguf = simulated_shape(args.simulate)
    llama3 = installed_llama3_tokenizer() if shape.vocab_size == LLAMA3_VOCAB_SIZE else None
    if args.tokenizer:
        tokenizer, note = load_tokenizer(Path(args.tokenizer)), f"lengths measured with {args.tokenizer}"
    elif gguf:
        tokenizer, note = gguf_tokenizer(gguf), "lengths measured with the GGUF's own tokenizer"
    elif llama3:
        tokenizer, note = load_tokenizer(llama3), "lengths measured with Llama 3's tokenizer (from llama-models)"
    else:
        tokenizer = demo_tokenizer()
        note = "lengths measured with the demo tokenizer, a stand-in for Llama 3's" + (
            f" (`{LLAMA_MODELS_INSTALL}` for the real one)" if shape.vocab_size == LLAMA3_VOCAB_SIZE else "")
    tp = args.tensor_parallel_size
    return Loaded(None, tokenizer, shape, False, args.max_seq_len or DEFAULT_MAX_SEQ_LEN,
                  f"{args.simulate} shape ({shape.num_params() / 1e9:.2f}B parameters, no weights"
                  + (f", on {tp} GPUs" if tp > 1 else "") + f"); {note}")


def simulated_shape(name_or_path: str) -> tuple[ModelArgs, Path | None]:
    """--simulate's shape: a named one, a params.json / config.json or a folder holding one, or a GGUF
    file or a folder holding one (its metadata: no tensor is read); and that GGUF, if it was one."""
    path = Path(name_or_path)
    has_config = path.is_dir() and any((path / name).is_file() for name in CONFIG_FILES)
    gguf = gguf_file(path) if name_or_path not in NAMED_SHAPES and path.exists() and not has_config else None
    return (read_gguf_config(gguf), gguf) if gguf else (resolve_shape(name_or_path), None)


def resolve_budget(args: argparse.Namespace, loaded: Loaded, config: EngineConfig, backend: AttentionBackend | None,
                   block_size: int) -> Budget:
    tp = config.tensor_parallel
    if args.kv_cache_gb is not None:
        return per_rank_budget(user_budget(args.kv_cache_gb), args.tensor_parallel_size)
    if args.simulate:
        if args.gpu_memory_gb is None:
            raise UsageError("--simulate needs --gpu-memory-gb G (the GPU to plan for) or --kv-cache-gb")
        return simulated_budget(loaded.args, args.gpu_memory_gb, args.gpu_memory_utilization, config.dtype.itemsize,
                                args.tensor_parallel_size)
    if config.device.type == "cuda":
        total = torch.cuda.mem_get_info(config.device)[1]
        peak = warmup_peak_bytes(config, loaded.model, backend, block_size)
        budget = cuda_default_budget(args.gpu_memory_utilization, peak, total)
        if tp.size == 1:
            return budget
        # Every rank must cut the same pool (identical decisions): the rank with the least left sets it.
        least = torch.tensor([budget.kv_bytes], device=config.device)
        torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN)
        return per_rank_budget(Budget(int(least.item()), f"the least of the ranks; rank 0: {budget.explanation}"),
                               tp.size)
    return cpu_default_budget(config.bytes_per_slot, loaded.max_seq_len)


def _output_index(seq: Sequence) -> dict:
    """Which of its request's outputs `seq` is: its sample, or its beam's rank and score."""
    group = seq.group
    if group.beam_width > 1:
        return {"beam_index": group.outputs().index(seq), "cumulative_logprob": seq.cum_logprob}
    return {"sample_index": group.outputs().index(seq)} if group.n > 1 else {}


def _answer(seq: Sequence, loaded: Loaded) -> dict:
    """One output as --json and --output write it (vLLM's names for the token ids)."""
    return {"id": seq.request_id, **_output_index(seq), "prompt_tokens": seq.num_prompt_tokens,
            "output_tokens": seq.num_output_tokens, "prompt_token_ids": seq.token_ids[:seq.num_prompt_tokens],
            "output_token_ids": seq.output_ids, "finish_reason": seq.finish_reason,
            "preemptions": seq.num_preemptions, "text": answer_text(seq, loaded)}


def answer_text(seq: Sequence, loaded: Loaded) -> str:
    """The answer, without the end-of-turn token that stopped it."""
    return loaded.tokenizer.decode(seq.output_ids[:-1] if seq.finish_reason == "stop" else seq.output_ids)


def _write_line(stream, seq: Sequence, loaded: Loaded) -> None:
    stream.write(json.dumps(_answer(seq, loaded), ensure_ascii=False) + "\n")
    stream.flush()

"""The command line both twins share: `llama3-naive.py` and `llama3-paged.py` call `main`.

The twins differ in one thing, the KV cache they build (`build_cache`): the naive twin
reserves one `max_seq_len` row per request up front, the paged twin a pool of small blocks
handed out on demand. Everything else, from the model to the report, is this file.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from .attention import BACKENDS, select_backend
from .budget import (DEFAULT_GPU_MEMORY_UTILIZATION, MAX_PREFILL_TOKENS, Budget, cpu_default_budget,
                     cuda_default_budget, naive_max_rows, paged_num_blocks, user_budget)
from .data import default_data_path, load_sharegpt
from .engine import Engine, Request, RunResult
from .errors import OutOfKVMemory, UsageError, UserError
from .kv_cache import KVCache
from .loading import DEMO, Loaded, load, resolve_device, resolve_dtype
from .report import format_memory_report, human_bytes
from .sampling import SamplingParams
from .sequence import Sequence
from .workload import build_requests

TWINS = {"naive": "naive (contiguous max_seq_len preallocation per request)",
         "paged": "paged (blocks allocated on demand)"}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def build_parser(twin: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"llama3-{twin}.py",
                                description=f"Batched Llama 3 generation over ShareGPT prompts with a {TWINS[twin]} "
                                            "KV cache, ending with a memory report.")
    p.add_argument("batch_size", type=positive_int, metavar="BATCH_SIZE",
                   help="number of ShareGPT prompts to run at once")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEMO, help="checkpoint directory (Meta or Hugging Face format), or "
                                                 "'demo' for the built-in random-weight model (default)")
    g.add_argument("--tokenizer", help="tokenizer.model (tiktoken) or tokenizer.json; default: found in --model")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    g.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 "
                                                   "(auto: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--attention", default="auto", help=f"attention backend: {', '.join(BACKENDS)} (default auto: "
                                                       "flash-attn, else triton on CUDA, else torch)")
    g = p.add_argument_group("workload")
    g.add_argument("--data", type=Path, help="ShareGPT JSON file (default: the shipped sharegpt-filtered.json)")
    g.add_argument("--max-seq-len", type=positive_int,
                   help="context length per request: prompt + answer (default 8192; 4096 for the demo)")
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
    if twin == "paged":
        g.add_argument("--block-size", type=positive_int, default=16, help="KV slots per block (default 16)")
        g.add_argument("--num-blocks", type=positive_int, help="pool size in blocks (default: the KV budget)")
    g = p.add_argument_group("output")
    g.add_argument("--json", type=Path, help="write answers and the report as one JSON object")
    g.add_argument("--output", type=Path, help="stream each finished request as a JSON line the moment it ends")
    g.add_argument("--no-answers", action="store_true", help="do not print the generated answers")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def main(twin: str, argv: list[str] | None = None) -> int:
    parser = build_parser(twin)
    args = parser.parse_args(argv)
    try:
        return run(twin, args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except torch.cuda.OutOfMemoryError as e:
        if args.debug:
            raise
        print(f"error: CUDA ran out of memory ({str(e).splitlines()[0]}); lower the batch size, --kv-cache-gb "
              "or --gpu-memory-utilization", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the user gets one line; --debug shows the rest
        if args.debug:
            raise
        where = traceback.extract_tb(e.__traceback__)[-1]
        print(f"error: internal error {type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno}); "
              "rerun with --debug and report it", file=sys.stderr)
        return 1


def run(twin: str, args: argparse.Namespace) -> int:
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    block_size = args.block_size if twin == "paged" else None
    data_path = args.data or default_data_path()
    conversations, skipped = load_sharegpt(data_path)
    loaded = load(args.model, args.tokenizer, device, dtype, args.max_seq_len)
    if block_size is not None and block_size > loaded.max_seq_len:
        raise UsageError(f"--block-size {block_size} is larger than --max-seq-len {loaded.max_seq_len}")
    requests = build_requests(conversations, loaded.tokenizer, args.batch_size, loaded.max_seq_len,
                              args.max_new_tokens, reference_lengths=loaded.is_demo)
    backend = select_backend(args.attention, device, dtype, block_size or loaded.max_seq_len)
    budget = resolve_budget(args, loaded, device, dtype)
    cache = build_cache(twin, args, loaded, requests, budget, backend, device, dtype)

    print(f"llama3-{twin}.py: {len(requests)} requests from {data_path} "
          f"({skipped} conversations skipped: no usable human turn)")
    print(f"model: {loaded.description}; {device.type}, {str(dtype).removeprefix('torch.')}")
    print(f"KV cache: {TWINS[twin]}; attention backend: {backend.name}")
    print(f"KV budget: {human_bytes(budget.kv_bytes)} ({budget.explanation})")
    print(f"KV capacity: {cache.capacity_tokens} tokens ({cache.num_blocks} blocks x {cache.block_size}); maximum "
          f"concurrency for {loaded.max_seq_len}-token requests: "
          f"{budget.kv_bytes / (loaded.max_seq_len * cache.bytes_per_slot):.2f}x")

    engine = Engine(loaded.model, cache, SamplingParams(args.temperature, args.top_p, args.seed),
                    loaded.tokenizer.stop_ids, ignore_eos=args.ignore_eos or loaded.is_demo,
                    max_prefill_tokens=MAX_PREFILL_TOKENS)
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
    if not args.no_answers:
        for seq in finished:
            print(f"\n{'=' * 30} request {seq.request_id}: {seq.num_prompt_tokens} prompt tokens, "
                  f"{seq.num_output_tokens} generated ({seq.finish_reason}) {'=' * 30}")
            print(loaded.tokenizer.decode(seq.output_ids))
        print("=" * 80)
    if result.interrupted:
        print(f"\ninterrupted after {result.steps} steps: {len(finished)} of {len(requests)} requests finished; "
              "the report covers the run so far")
    summary = engine.memory.summary(budget.kv_bytes)
    stats = engine.scheduler.stats
    out_tokens = sum(s.num_output_tokens for s in result.sequences)
    print()
    print(format_memory_report(summary, f"KV memory report: {TWINS[twin]}, {len(requests)} requests"))
    print(f"  run: {result.steps} steps, {out_tokens} tokens generated in {elapsed:.1f} s "
          f"({out_tokens / elapsed:.1f} tok/s); peak running {stats.peak_running}, preemptions {stats.preemptions}; "
          f"every request resident at once: {'yes' if stats.all_resident else 'no'}")
    if args.json:
        write_json(args.json, twin, args, loaded, backend.name, requests, result, summary, stats, elapsed)
    return 130 if result.interrupted else 0


def resolve_budget(args: argparse.Namespace, loaded: Loaded, device: torch.device, dtype: torch.dtype) -> Budget:
    if args.kv_cache_gb is not None:
        return user_budget(args.kv_cache_gb)
    bytes_per_token = loaded.args.kv_bytes_per_token(dtype.itemsize)
    if device.type == "cuda":
        total = torch.cuda.mem_get_info(device)[1]
        return cuda_default_budget(args.gpu_memory_utilization, warmup_peak_bytes(loaded, device, dtype), total)
    return cpu_default_budget(bytes_per_token, loaded.max_seq_len)


def warmup_peak_bytes(loaded: Loaded, device: torch.device, dtype: torch.dtype) -> int:
    """Peak CUDA memory of a forward over the largest prefill step, through a throwaway cache."""
    torch.cuda.reset_peak_memory_stats(device)
    tokens = min(MAX_PREFILL_TOKENS, loaded.max_seq_len - 1)
    cache = KVCache(loaded.args, num_blocks=1, block_size=loaded.max_seq_len, max_seq_len=loaded.max_seq_len,
                    max_num_seqs=1, backend=select_backend("torch", device, dtype, loaded.max_seq_len),
                    device=device, dtype=dtype)
    engine = Engine(loaded.model, cache, SamplingParams(), frozenset())
    engine.run([Request("warmup", [0] * tokens, 1)], progress=False)
    kv_bytes = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    del engine, cache
    torch.cuda.empty_cache()
    return torch.cuda.max_memory_allocated(device) - kv_bytes


def build_cache(twin: str, args: argparse.Namespace, loaded: Loaded, requests: list[Request], budget: Budget,
                backend, device: torch.device, dtype: torch.dtype) -> KVCache:
    """The only difference between the twins."""
    bytes_per_token = loaded.args.kv_bytes_per_token(dtype.itemsize)
    max_len = loaded.max_seq_len
    if twin == "naive":
        rows = naive_max_rows(budget.kv_bytes, max_len, bytes_per_token)
        need = len(requests) * max_len * bytes_per_token
        if rows == 0:
            raise OutOfKVMemory(f"the KV budget {human_bytes(budget.kv_bytes)} is too small for even one "
                                f"{max_len}-token preallocation ({human_bytes(max_len * bytes_per_token)}); raise "
                                "--kv-cache-gb or lower --max-seq-len")
        if len(requests) > rows:
            raise OutOfKVMemory(f"out of KV memory: {len(requests)} requests x {max_len} preallocated slots need "
                                f"{human_bytes(need)} but the budget is {human_bytes(budget.kv_bytes)}; the largest "
                                f"batch that fits is {rows} (or run llama3-paged.py)")
        num_blocks, block_size = len(requests), max_len
    else:
        block_size = args.block_size
        num_blocks = args.num_blocks or paged_num_blocks(budget.kv_bytes, block_size, bytes_per_token)
        longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
        if num_blocks * block_size < longest:
            raise OutOfKVMemory(f"the KV pool ({num_blocks} blocks x {block_size} = {num_blocks * block_size} slots, "
                                f"{human_bytes(num_blocks * block_size * bytes_per_token)}) cannot hold even the "
                                f"longest request ({longest} tokens); raise --kv-cache-gb or --num-blocks")
    try:
        return KVCache(loaded.args, num_blocks, block_size, max_len, len(requests), backend, device, dtype)
    except torch.cuda.OutOfMemoryError:
        raise OutOfKVMemory(f"CUDA could not allocate the {human_bytes(num_blocks * block_size * bytes_per_token)} "
                            "KV cache; lower --kv-cache-gb, the batch size or --gpu-memory-utilization") from None


def _answer(seq: Sequence, loaded: Loaded) -> dict:
    return {"id": seq.request_id, "prompt_tokens": seq.num_prompt_tokens, "output_tokens": seq.num_output_tokens,
            "finish_reason": seq.finish_reason, "preemptions": seq.num_preemptions,
            "text": loaded.tokenizer.decode(seq.output_ids)}


def _write_line(stream, seq: Sequence, loaded: Loaded) -> None:
    stream.write(json.dumps(_answer(seq, loaded), ensure_ascii=False) + "\n")
    stream.flush()


def write_json(path: Path, twin: str, args: argparse.Namespace, loaded: Loaded, backend: str,
               requests: list[Request], result: RunResult, memory: dict, stats, elapsed: float) -> None:
    out_tokens = sum(s.num_output_tokens for s in result.sequences)
    doc = {
        "twin": twin,
        "model": args.model,
        "device": str(loaded.model.output.weight.device),
        "dtype": str(loaded.model.output.weight.dtype).removeprefix("torch."),
        "attention": backend,
        "batch_size": len(requests),
        "max_seq_len": loaded.max_seq_len,
        "interrupted": result.interrupted,
        "steps": result.steps,
        "elapsed_s": elapsed,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed if elapsed else 0.0,
        "requests": [_answer(s, loaded) for s in result.sequences if s.finish_reason],
        "memory": memory,
        "scheduler": {"peak_running": stats.peak_running, "preemptions": stats.preemptions,
                      "all_resident": stats.all_resident},
    }
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")

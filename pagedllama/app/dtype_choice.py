"""Which dtype a run computes in, and why: `--dtype` as given, or what `auto` picks for this machine.

On a GPU, `auto` is bfloat16 (float16 where the GPU lacks it). On a CPU, bfloat16 halves the
weights' and the KV cache's memory, but only CPUs with AMX (Intel Sapphire Rapids and later) have
hardware bfloat16 matmuls; elsewhere PyTorch emulates them, tens of times slower than float32 on
this project's AVX2 machine. Even with AMX the gain depends on the shape (BENCHMARKS.md: 333 ms ->
119 ms for a 100M decode step at batch 97), so `auto` times the model's largest per-layer matmul at
the run's batch, in both dtypes, and takes bfloat16 only where it is faster. The batch timed:
BATCH_SIZE (for `compare`, the batch both twins run: one decision for both); `--find-max-batch`
without one, which runs no forward pass, times batch 1.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..model.config import ModelArgs
from ..model.parallel import SINGLE, TensorParallel

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The timed matmul is cut to at most this much work and weight, so that the decision costs tens of
# ms even for Llama 3 70B: ~2 ms per float32 product on one AVX2 core.
MEASURE_FLOPS = 2 ** 26
MEASURE_WEIGHT_ELEMENTS = 2 ** 22  # 16 MB in float32: beyond the caches of one core, as a layer's weight is
REPEATS = 5


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run computes in, with a one-line reason for the startup lines."""

    dtype: torch.dtype
    reason: str  # e.g. "float32 (auto: this CPU has no AMX for bfloat16 matmuls)"


@dataclass(frozen=True)
class MatmulShape:
    """x (rows, inner) @ W (inner, cols): the slice timed of a (inner, full_cols) weight."""

    rows: int
    inner: int
    cols: int
    full_cols: int

    def describe(self) -> str:
        whole = f"{self.inner}x{self.full_cols}"
        part = "" if self.cols == self.full_cols else f" ({self.cols} of its columns)"
        return f"at batch {self.rows} a {whole} matmul{part}"


def has_amx_bf16() -> bool:
    """Whether this CPU has AMX's bfloat16 tiles (hardware bfloat16 matmuls)."""
    return bool(torch.cpu.get_capabilities().get("amx_bf16", False))


def time_matmul(shape: MatmulShape, dtype: torch.dtype, repeats: int = REPEATS) -> float:
    """Median seconds of one `shape` product in `dtype`, on the threads this process runs with."""
    x = torch.full((shape.rows, shape.inner), 0.5, dtype=dtype)
    w = torch.full((shape.inner, shape.cols), 0.5, dtype=dtype)
    torch.mm(x, w)  # warm-up: oneDNN picks and caches its kernel on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(x, w)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def largest_layer_matmul(args: ModelArgs, batch: int, tp: TensorParallel = SINGLE) -> MatmulShape:
    """The decode step's (batch, dim) @ (dim, hidden_dim) product of the MLP (this rank's share of
    it), cut to MEASURE_FLOPS and MEASURE_WEIGHT_ELEMENTS."""
    full = args.hidden_dim // tp.size
    cols = max(1, min(full, MEASURE_FLOPS // (2 * batch * args.dim), MEASURE_WEIGHT_ELEMENTS // args.dim))
    return MatmulShape(batch, args.dim, cols, full)


def choose_cpu_dtype(matmul: Callable[[], MatmulShape]) -> DtypeChoice:
    """bfloat16 where AMX runs the `matmul()` product faster than float32; float32 otherwise (the
    shape is asked for only where there is AMX: finding it may read the checkpoint's config)."""
    if not has_amx_bf16():
        return DtypeChoice(torch.float32, "float32 (auto: this CPU has no AMX for bfloat16 matmuls)")
    shape = matmul()
    bf16, fp32 = time_matmul(shape, torch.bfloat16), time_matmul(shape, torch.float32)
    timing = f"{shape.describe()} took {bf16 * 1e3:.2f} ms in bfloat16 vs {fp32 * 1e3:.2f} ms in float32"
    if bf16 < fp32:
        return DtypeChoice(torch.bfloat16, f"bfloat16 (auto: AMX; {timing})")
    return DtypeChoice(torch.float32, f"float32 (auto: AMX, but {timing})")


def resolve_dtype(name: str, device: torch.device, model_args: Callable[[], ModelArgs], batch: int,
                  tp: TensorParallel = SINGLE) -> DtypeChoice:
    """`--dtype name` on `device`. On CPU, `auto` asks for `model_args()` only where there is AMX (with
    `batch`, they size the matmul timed); with several ranks, rank 0's choice is every rank's."""
    if name in DTYPES:
        return DtypeChoice(DTYPES[name], f"{name} (--dtype)")
    if name != "auto":
        raise UsageError(f"unknown --dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "bfloat16 (auto: the GPU has bfloat16)")
        return DtypeChoice(torch.float16, "float16 (auto: the GPU lacks bfloat16)")
    mine = choose_cpu_dtype(lambda: largest_layer_matmul(model_args(), batch, tp)) if tp.rank == 0 else None
    if tp.size == 1:
        return mine
    bf16 = tp.from_rank0(torch.tensor([int(mine is not None and mine.dtype == torch.bfloat16)])).item() == 1
    return mine or DtypeChoice(torch.bfloat16 if bf16 else torch.float32,
                               f"{'bfloat16' if bf16 else 'float32'} (auto: rank 0's choice)")

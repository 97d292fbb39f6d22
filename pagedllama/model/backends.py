"""Which attention backend a run gets: the one asked for, or what `auto` picks, with a one-line
error saying why a backend cannot run here and what to use instead."""
from __future__ import annotations

import importlib.util
import os

import torch

from ..errors import UsageError
from .attention import FLASH_ATTN_PAGE_MULTIPLE, AttentionBackend, FlashAttention, TorchAttention, TritonAttention
from .flex_attention import FlexAttention, flex_problem

BACKENDS = ("auto", "flash-attn", "triton", "flex", "torch")
# `--attention auto` on CPU: flex (blocks read in place) for models at least this large. At the 100M
# preset's shapes it took 0.59-0.94x the torch backend's decode attention from batch 16, and 0.86-0.94x
# its whole step at batch 16-64; on the 5.4M demo its per-call and compile costs outweigh the gain
# (BENCHMARKS.md, "Decode against this CPU's limit").
FLEX_AUTO_MIN_PARAMS = 100_000_000


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def select_backend(name: str, device: torch.device, dtype: torch.dtype, block_size: int,
                   twin_block_size: int, num_params: int = 0) -> AttentionBackend:
    """The backend asked for, for a cache of `block_size`-slot blocks, or a clear error saying why it
    cannot run here and what to use.

    `auto` picks a backend that the other twin's cache (`twin_block_size`-slot blocks) can use
    too, so that whichever twin runs, the two run the same kernel: flash-attn if it is installed
    on CUDA and both block sizes are multiples of 256, else triton on CUDA; on CPU flex for models
    of at least FLEX_AUTO_MIN_PARAMS parameters where it can be compiled, else torch.
    """
    cuda = device.type == "cuda"
    if name == "auto":
        pages_fit = all(b % FLASH_ATTN_PAGE_MULTIPLE == 0 for b in (block_size, twin_block_size))
        if cuda and _importable("flash_attn") and pages_fit and dtype in (torch.float16, torch.bfloat16):
            name = "flash-attn"
        elif cuda and _importable("triton"):
            name = "triton"
        elif (not cuda and num_params >= FLEX_AUTO_MIN_PARAMS
              and not flex_problem(device, (block_size, twin_block_size))):
            name = "flex"
        else:
            name = "torch"
    if name == "flash-attn":
        if not cuda:
            raise UsageError("--attention flash-attn needs a CUDA GPU; use --attention torch here")
        if not _importable("flash_attn"):
            raise UsageError("flash-attn is not installed; `pip install flash-attn --no-build-isolation`, "
                             "or use --attention triton")
        if block_size % FLASH_ATTN_PAGE_MULTIPLE:
            raise UsageError(f"flash-attn's paged kernel needs a block size that is a multiple of "
                             f"{FLASH_ATTN_PAGE_MULTIPLE}, not {block_size}; use --block-size 256 or "
                             "--attention triton")
        if dtype not in (torch.float16, torch.bfloat16):
            raise UsageError("flash-attn runs in float16 or bfloat16 only; use --dtype bfloat16")
        return FlashAttention()
    if name == "triton":
        if not _importable("triton"):
            raise UsageError("triton is not installed; `pip install triton`, or use --attention torch")
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("--attention triton needs a CUDA GPU (or TRITON_INTERPRET=1, very slow); "
                             "use --attention torch here")
        return TritonAttention()
    if name == "flex":
        if problem := flex_problem(device, (block_size,)):
            raise UsageError(problem)
        return FlexAttention()
    if name == "torch":
        return TorchAttention()
    raise UsageError(f"unknown --attention {name!r}; choose one of {', '.join(BACKENDS)}")

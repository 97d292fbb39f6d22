"""One run's settings, resolved from the command line once, and the shape of its KV pool.

`EngineConfig` is what every part of the engine reads its settings from (as nano-vllm's
`Config`); `CacheLayout` is how the pool is cut into blocks, which `budget.cache_layout` derives
from the twin: the one place the words naive and paged decide anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.config import ModelArgs
from ..model.parallel import SINGLE, TensorParallel
from ..units import GB
from .reservation import RESERVE_POLICIES
from .sampling import SamplingParams

TWINS = ("naive", "paged")
PAGED_BLOCK_SIZE = 16  # the paged twin's default --block-size
# Prompt tokens one prefill step may take: bounds the step's activation memory (budget.py
# plans for it). Dry runs and real runs both use it, so they schedule the same steps.
MAX_PREFILL_TOKENS = 4096
PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class CacheLayout:
    """The KV pool: `num_blocks` blocks of `block_size` slots. `preallocated`: each sequence's one
    block is its whole context, reserved when it is admitted (the naive twin's rows). `contiguous`:
    each sequence's reservation, taken at admission, is one run of consecutive blocks, from a region
    where holes form (the naive twin's `--reserve pow2 | oracle`)."""

    block_size: int
    num_blocks: int
    preallocated: bool = False
    contiguous: bool = False

    @property
    def reserves_at_admission(self) -> bool:
        """Sequences never grow: all their slots are reserved when they are admitted."""
        return self.preallocated or self.contiguous

    @property
    def capacity_tokens(self) -> int:
        return self.block_size * self.num_blocks


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from, but the model, the attention backend and the batch."""

    twin: str  # "naive" or "paged": read only by budget.cache_layout
    model_args: ModelArgs
    max_seq_len: int
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    block_size: int = PAGED_BLOCK_SIZE  # the paged twin's blocks
    num_blocks: int | None = None  # the paged twin's pool, when not what the KV budget holds
    max_prefill_tokens: int = MAX_PREFILL_TOKENS
    preemption: str = "recompute"  # or "swap", to a CPU pool of `swap_space_bytes`
    swap_space_bytes: int = 4 * GB
    prefix_caching: bool = False
    cuda_graphs: bool = False  # decode replays captured graphs (triton backend)
    sampling: SamplingParams = SamplingParams()
    stop_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    reserve: str = "max"  # the naive twin's reservation policy (reservation.py); read only by budget.cache_layout
    # This process's rank among the tensor-parallel ranks. Every rank builds the same scheduler and
    # block manager from the same config and so decides the same; budgets and `bytes_per_slot`
    # count all ranks together (each rank stores 1/N of every slot's KV heads).
    tensor_parallel: TensorParallel = SINGLE

    def __post_init__(self):
        if self.reserve not in RESERVE_POLICIES:
            raise ValueError(f"reserve must be one of {RESERVE_POLICIES}, not {self.reserve!r}")
        if self.twin not in TWINS:
            raise ValueError(f"twin must be one of {TWINS}, not {self.twin!r}")
        if self.preemption not in PREEMPTION_MODES:
            raise ValueError(f"preemption must be one of {PREEMPTION_MODES}, not {self.preemption!r}")

    @property
    def bytes_per_slot(self) -> int:
        """K and V of one token in all layers."""
        return self.model_args.kv_bytes_per_token(self.dtype.itemsize)

    def swap_blocks(self, layout: CacheLayout) -> int:
        """Blocks of the CPU swap pool (0 when preempted requests are recomputed)."""
        if self.preemption != "swap":
            return 0
        return self.swap_space_bytes // (layout.block_size * self.bytes_per_slot)

"""The KV tensors: every layer's K and V in blocks, the CPU swap pool, and the attention that reads them.

What blocks hold is decided elsewhere (engine/block_manager.py, in plain Python); this class only
stores, applies the block copies and swaps it is handed, and dispatches attention to its backend.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..engine.block_manager import COPY, SWAP_IN, SWAP_OUT
from .attention import AttentionBackend, StepMetadata
from .config import ModelArgs
from .parallel import SINGLE, TensorParallel

if TYPE_CHECKING:
    from ..engine.block_manager import BlockCopy, BlockOps
    from ..engine.config import CacheLayout


class KVCache:
    """K/V of all layers in `layout.num_blocks` blocks on `device`, and `swap_blocks` blocks in CPU memory;
    with tensor parallelism, this rank's KV heads of every block (the block ids are every rank's)."""

    def __init__(self, args: ModelArgs, layout: CacheLayout, backend: AttentionBackend | None,
                 device: torch.device, dtype: torch.dtype, swap_blocks: int = 0, tp: TensorParallel = SINGLE):
        self.backend = backend
        self.device = device
        self.scale = args.head_dim ** -0.5
        # One tensor, so that copying a block (copy on write, swapping) is one op over all layers.
        shape = (2, args.n_layers, layout.num_blocks, layout.block_size, args.n_kv_heads // tp.size, args.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)
        self.k, self.v = list(self.kv[0]), list(self.kv[1])
        # Pinned on CUDA, so that swaps are DMA copies; left unwritten until a swap writes it.
        self.swap_kv = torch.empty((*shape[:2], swap_blocks, *shape[3:]), dtype=dtype,
                                   pin_memory=device.type == "cuda") if swap_blocks else None

    def apply(self, ops: BlockOps) -> None:
        """The block copies and swaps scheduling decided, in their order (see `BlockOps`)."""
        pools = {COPY: (self.kv, self.kv), SWAP_OUT: (self.kv, self.swap_kv), SWAP_IN: (self.swap_kv, self.kv)}
        for kind, pairs in ops.runs:
            _copy_blocks(*pools[kind], pairs)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: StepMetadata) -> torch.Tensor:
        """Store this step's K/V for `layer` and attend over each sequence's whole context."""
        return self.backend.forward(q, k, v, self.k[layer], self.v[layer], meta, self.scale)


def _copy_blocks(src: torch.Tensor, dst: torch.Tensor, pairs: list[BlockCopy]) -> None:
    """Copy blocks (source, destination) between pools or within one, all layers of K and V at once.
    Within a run no destination is another pair's source (each goes to a block just allocated)."""
    src_ids = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=src.device)
    dst_ids = torch.tensor([d for _, d in pairs], dtype=torch.long, device=dst.device)
    dst[:, :, dst_ids] = src[:, :, src_ids].to(dst.device)

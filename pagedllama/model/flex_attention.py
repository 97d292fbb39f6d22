"""Paged attention that reads K/V blocks where they lie: PyTorch's FlexAttention with a block table.

The torch backend copies each sequence's blocks into scratch before SDPA reads them again. Here
the cache is one long key sequence, (1, Hkv, num_blocks * block_size, D), and a `BlockMask` built
from the block tables tells the compiled kernel which blocks each query visits: its
`full_kv_indices` are a sequence's whole blocks, its `kv_indices` the partly written last block,
where `mask_mod` hides the slots past the context. Only the blocks named are read, in place.
That is PagedAttention. `torch.compile` turns it into a C++ kernel on CPU (inductor) and a
Triton one on CUDA. Triton's template computes in tiles of at least 16 query rows and wants the
block mask's tiles to be whole multiples of its own (its defaults, 128 x 64, are not): on CUDA the
kernel is told the block mask's tiles, as vLLM's flex backend does; not yet run on a GPU here.

Compilation: the first step of each kind (decode, prefill after cached context) compiles for its
shapes, and the first change of batch size or chunk length compiles once more with those sizes
dynamic; after that every batch and context length reuses that kernel. Everything sized by the
cache (its slots, the block-mask columns, the per-tile tensors `mask_mod` reads) is marked static,
so a second cache in the process (`compare`) compiles its own kernel: torch 2.13's CPU template
miscompiles a bounds check on a `mask_mod` tensor of dynamic size.
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sys

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..errors import UsageError
from .attention import StepMetadata, TorchAttention, Workspace, write_kv

FLEX_BLOCK_MULTIPLE = 16
# Decode batches smaller than this go the torch backend's way (gather, then SDPA): faster there at
# batch 1 on the CPU measured (BENCHMARKS.md, "Decode against this CPU's limit"), and a batch of 1
# would make torch.compile specialize one more kernel for it.
FLEX_MIN_BATCH = 8
CHUNK_QUERY_TILE = 128  # query rows per tile of a prompt chunk
CUDA_MIN_QUERY_TILE = 16  # the smallest query tile Triton's template computes
CUDA_MAX_KERNEL_ROWS = 64  # query rows per kernel tile on CUDA (shared memory at float32 and head dim 128)
# Triton's template computes a K/V element's offset (slot x slot stride) in int32 (torch 2.13 and
# before; pytorch#185264 widens it): past this many elements in a layer it reads the wrong memory.
CUDA_MAX_LAYER_ELEMENTS = 2 ** 31
RECOMPILE_LIMIT = 64
_compiled_flex = None  # one compiled kernel for every backend instance: compiling costs seconds


def _flex(*args, **kwargs) -> torch.Tensor:
    global _compiled_flex
    if _compiled_flex is None:
        # Past its recompile limit torch.compile would fall back to flex_attention run eagerly, an
        # unfused kernel far slower. A process that builds several caches (`compare`, the tests)
        # needs more than the default 8 kernels; should it ever run out, it stops with an error
        # rather than going on slowly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        _compiled_flex = torch.compile(flex_attention)
        print("flex attention: compiling its kernels (seconds, once per kind of step; inductor keeps them "
              "on disk for later runs)", file=sys.stderr)
    return _compiled_flex(*args, **kwargs)


def kernel_block_size(block_size: int) -> int:
    """The kernel's K/V tile: 16, 32 or 64 slots, the largest that divides the block size (the naive
    twin's blocks are whole max_seq_len rows, far too long for one tile)."""
    if problem := block_size_problem(block_size):
        raise UsageError(problem)
    return math.gcd(block_size, 64)


def block_size_problem(block_size: int) -> str | None:
    """Torch 2.13's CPU kernel gave wrong results with 8-slot tiles: blocks must be multiples of 16."""
    if block_size % FLEX_BLOCK_MULTIPLE:
        return (f"--attention flex needs a block size that is a multiple of {FLEX_BLOCK_MULTIPLE}, not "
                f"{block_size} (the naive twin's block is --max-seq-len); use --attention torch")
    return None


def flex_problem(device: torch.device, block_sizes: tuple[int, ...]) -> str | None:
    """Why the kernel cannot be built here for caches of these block sizes, or None: torch.compile
    needs a C++ compiler on CPU and Triton on CUDA."""
    for block_size in block_sizes:
        if problem := block_size_problem(block_size):
            return problem
    if device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
        return ("--attention flex compiles its kernel with a C++ compiler, and g++ is not installed "
                "(`apt install g++`); use --attention torch")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return ("--attention flex on CUDA compiles its kernel with Triton: `pip install triton`, or use "
                "--attention torch")
    return None


def pool_problem(shape: tuple[int, ...], device: torch.device) -> str | None:
    """Why the kernel cannot address a layer's (num_blocks, block_size, Hkv, D) cache on `device`, or
    None: on CUDA, one of more than CUDA_MAX_LAYER_ELEMENTS elements (vLLM refuses those too)."""
    if device.type != "cuda" or math.prod(shape) <= CUDA_MAX_LAYER_ELEMENTS:
        return None
    most = CUDA_MAX_LAYER_ELEMENTS // math.prod(shape[1:])
    return (f"--attention flex on CUDA: FlexAttention's Triton kernel addresses K/V with 32-bit offsets, which "
            f"reach {most} blocks of {shape[1]} slots at this model's shape, and this KV pool has {shape[0]}; "
            "lower --kv-cache-gb, --num-blocks or the batch size, or use --attention triton")


def expand_block_tables(block_tables: torch.Tensor, ratio: int) -> torch.Tensor:
    """Block tables in units of `block_size / ratio`-slot tiles: tile j of a sequence is tile
    j % ratio of its cache block j // ratio."""
    if ratio == 1:
        return block_tables
    tiles = torch.arange(ratio, device=block_tables.device, dtype=block_tables.dtype)
    return (block_tables[:, :, None] * ratio + tiles).flatten(1)


class FlexAttention(TorchAttention):
    """Decode (and, with `chunks_in_place`, prefill after cached context) reads the cache in place
    through a block mask; a prompt with nothing cached before it attends to its own fresh K/V, as
    in the torch backend, and so do decode batches under `min_batch`."""

    name = "flex"

    def __init__(self, min_batch: int = FLEX_MIN_BATCH, chunks_in_place: bool = False):
        super().__init__()
        self.min_batch = min_batch  # smaller decode batches take the torch backend's path
        # Prompt chunks after cached context read it in place too. Off by default: on the CPU measured
        # the compiled kernel took 3x the gather + SDPA time for them (BENCHMARKS.md); not yet
        # measured on a GPU.
        self.chunks_in_place = chunks_in_place
        self._indices = Workspace()  # (B, tiles in the cache) block-mask index rows, reused step to step
        self._decode_mask: tuple[StepMetadata, BlockMask] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: StepMetadata, scale: float) -> torch.Tensor:
        if meta.is_prefill or len(meta.query_lens) < self.min_batch:
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if self._decode_mask is None or self._decode_mask[0] is not meta:  # built by the first layer
            group = q.shape[1] // k_cache.shape[2]
            self._decode_mask = meta, self._decode_block_mask(meta, k_cache, group)
        # The query heads of each KV head as the rows of one query: the kernel reads each KV head
        # once for all of them (0.75x the time of one row per head, enable_gqa, at batch 64).
        rows = q.view(q.shape[0], k_cache.shape[2], -1, q.shape[-1])
        mask = self._decode_mask[1]
        out = _flex(rows, _as_one_sequence(k_cache), _as_one_sequence(v_cache), block_mask=mask, scale=scale,
                    kernel_options=kernel_options(q.device, *mask.BLOCK_SIZE))
        return out.view(q.shape)

    def _decode_block_mask(self, meta: StepMetadata, cache: torch.Tensor, group: int) -> BlockMask:
        """One tile of `group` query rows per sequence and KV head; sequence b reads its whole blocks
        unmasked and its last, partly written block through `mask_mod`, which keeps the slots below
        that block's fill."""
        tile, num_tiles, tables = _tiled(meta.block_tables, cache)
        device = cache.device
        b = len(tables)
        lens = meta.context_lens.long()
        num_full = lens // tile
        fill = lens % tile
        partial = (fill > 0).to(torch.int32)
        width = max(num_tiles, tables.shape[1])  # the kernel wants a column per tile of the cache
        full_indices = self._indices.get("full", (b, width), torch.int32, device)
        full_indices[:, :tables.shape[1]] = tables
        last = tables.gather(1, num_full.clamp(max=tables.shape[1] - 1)[:, None])
        partial_indices = self._indices.get("partial", (b, width), torch.int32, device)
        partial_indices[:, :1] = last
        # The fill of each partly written tile; sequences without one write to the spare last entry.
        # Two sequences share a partly written block only while both hold the same tokens in it
        # (a fork before either writes: the next write copies it), so one fill per tile is exact.
        tile_fill = _static(torch.zeros(num_tiles + 1, dtype=torch.int64, device=device))
        tile_fill[torch.where(partial.bool(), last[:, 0].long(), num_tiles)] = fill
        _static(full_indices, 1)
        _static(partial_indices, 1)

        def below_fill(batch, head, q_idx, kv_idx):
            return kv_idx % tile < tile_fill[kv_idx // tile]

        return BlockMask.from_kv_blocks(partial[:, None, None], partial_indices[:, None, None],
                                        num_full.to(torch.int32)[:, None, None], full_indices[:, None, None],
                                        BLOCK_SIZE=(decode_query_tile(group, device), tile), mask_mod=below_fill,
                                        seq_lengths=(group, num_tiles * tile), compute_q_blocks=False)

    def _prefill_after_cache(self, qi, k_cache, v_cache, meta: StepMetadata, i: int, scale: float) -> torch.Tensor:
        """Sequence `i`'s queries after its cached context, causal bottom-right, in place: query row r
        sees logical positions up to cached + r, found from a physical slot through the tile's place
        in the block table. A single query (a prompt wholly cached but its last token) goes the torch
        backend's way: torch.compile would specialize a kernel for a length of 1."""
        if not self.chunks_in_place or meta.query_lens[i] == 1:
            return super()._prefill_after_cache(qi, k_cache, v_cache, meta, i, scale)
        tile, num_tiles, tables = _tiled(meta.block_tables[i:i + 1], k_cache)
        table = tables[0]
        cached, q_len = meta.cached_lens[i], meta.query_lens[i]
        used = -(-(cached + q_len) // tile)
        tile_pos = _static(torch.full((num_tiles + 1,), -1, dtype=torch.int64, device=qi.device))
        tile_pos[table[:used].long()] = torch.arange(used, device=qi.device) * tile
        offset = torch.tensor([cached], device=qi.device)

        def causal(batch, head, q_idx, kv_idx):
            pos = tile_pos[kv_idx // tile]
            return (pos >= 0) & (pos + kv_idx % tile <= offset[0] + q_idx)

        q_tiles = -(-q_len // CHUNK_QUERY_TILE)
        indices = self._indices.get("prefill", (q_tiles, max(num_tiles, used)), torch.int32, qi.device)
        indices[:, :used] = table[:used]
        _static(indices, 1)
        # query tile r reaches up to the tile holding position cached + its last row
        last_row = torch.clamp(torch.arange(1, q_tiles + 1, device=qi.device) * CHUNK_QUERY_TILE, max=q_len) - 1
        num_kv = ((cached + last_row) // tile + 1).to(torch.int32)
        mask = BlockMask.from_kv_blocks(num_kv[None, None], indices[None, None], BLOCK_SIZE=(CHUNK_QUERY_TILE, tile),
                                        mask_mod=causal, seq_lengths=(q_len, num_tiles * tile),
                                        compute_q_blocks=False)
        return _flex(qi, _as_one_sequence(k_cache), _as_one_sequence(v_cache), block_mask=mask, scale=scale,
                     enable_gqa=True, kernel_options=kernel_options(qi.device, CHUNK_QUERY_TILE, tile))


def decode_query_tile(group: int, device: torch.device) -> int:
    """Query rows per block-mask tile in decode, where one tile holds the `group` query heads of a KV
    head: exactly those on CPU; on CUDA at least the 16 rows Triton computes at once."""
    if device.type != "cuda":
        return group
    return max(CUDA_MIN_QUERY_TILE, 1 << (group - 1).bit_length())


def kernel_options(device: torch.device, query_tile: int, kv_tile: int) -> dict | None:
    """On CUDA, Triton tiles that divide the block mask's (`query_tile` x `kv_tile`), and the general
    kernel for every batch: without `FORCE_USE_FLEX_ATTENTION` a batch size compiled as a constant
    would get the split-KV decoding kernel and a dynamic one the general kernel."""
    if device.type != "cuda":
        return None
    return {"BLOCK_M": min(query_tile, CUDA_MAX_KERNEL_ROWS), "BLOCK_N": kv_tile, "FORCE_USE_FLEX_ATTENTION": True}


def _tiled(block_tables: torch.Tensor, cache: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """The kernel's tile, the number of tiles in a layer's (num_blocks, block_size, Hkv, D) cache, and
    `block_tables` in tiles; checked once per step, a cache the kernel cannot address is refused."""
    if problem := pool_problem(tuple(cache.shape), cache.device):
        raise UsageError(problem)
    num_blocks, block_size = cache.shape[:2]
    tile = kernel_block_size(block_size)
    return tile, num_blocks * (block_size // tile), expand_block_tables(block_tables, block_size // tile)


def _as_one_sequence(cache: torch.Tensor) -> torch.Tensor:
    """(num_blocks, block_size, Hkv, D) as one sequence of every slot, (1, Hkv, slots, D): a view,
    its sizes static (see the module's docstring)."""
    return _static(cache.view(1, -1, *cache.shape[2:]).transpose(1, 2))


def _static(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """`t` (or its `dim`) compiled at its size, never as a dynamic one."""
    torch._dynamo.mark_static(t, dim)
    return t

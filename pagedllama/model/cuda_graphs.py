"""CUDA graphs for decode: one captured forward pass per batch-size bucket, replayed each step.

A decode step of Llama 3 8B launches some 500 kernels; at small batches launching them from
Python takes longer than the GPU takes to run them. A captured graph launches them all at once.
A graph replays fixed shapes at fixed addresses, so (as nano-vllm does):

- each bucket (1, 2, 4, 8, then multiples of 16) is captured once, largest first, all sharing
  one memory pool; a step runs the smallest bucket that holds its batch;
- the graphs read the model runner's decode buffers, where every decode step's inputs are
  prepared at the same addresses: the block tables at their full width (max_seq_len /
  block_size), padding rows with slot -1 (their K/V are written nowhere, see
  `triton_attention.store_kv`) and a context of 0 (they attend to nothing);
- the Triton kernel is captured for the longest context, max_seq_len, from which it sizes its
  context splits; a split past a sequence's end does no work.

Prefill stays eager: its shapes change every step. Only the Triton backend is captured: the
torch backend plans its decode groups on the host each step, and flash-attn appends K/V itself
at `cache_seqlens`, with no way to skip a padding row.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .attention import StepMetadata
from .kv_cache import KVCache
from .step_buffers import StepBuffers

if TYPE_CHECKING:
    from .model import Transformer


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every multiple of 16 up to one that holds `max_batch`."""
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch + 16, 16)) if max_batch > 8 else small + [max_batch]


class DecodeGraphs:
    """Replays decode steps of `model` over `cache` from captured CUDA graphs, reading the decode
    steps' inputs from `buffers` (the model runner prepares each step there).

    With `capture=False` the same padded forward runs eagerly: what the graphs replay,
    checkable on a machine without CUDA.
    """

    def __init__(self, model: Transformer, cache: KVCache, buffers: StepBuffers, max_seq_len: int,
                 capture: bool = True):
        if cache.backend is None or cache.backend.name != "triton":
            raise ValueError("CUDA graphs need the triton attention backend")
        self.model, self.cache, self.buffers, self.capture = model, cache, buffers, capture
        self.max_seq_len = max_seq_len
        self.buckets = batch_buckets(buffers.max_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def bucket(self, batch: int) -> int:
        """The smallest captured batch size that holds `batch`."""
        return next(x for x in self.buckets if x >= batch)

    def _meta(self, b: int) -> StepMetadata:
        """Metadata over the first `b` rows of the buffers (host lists: unused by Triton's decode)."""
        buf = self.buffers
        return StepMetadata(
            is_prefill=False, slot_mapping=buf.slot_mapping[:b], block_tables=buf.block_tables[:b],
            context_lens=buf.context_lens[:b], cache_seqlens=buf.context_lens[:b],
            context_start_loc=buf.query_start_loc[:b + 1], query_start_loc=buf.query_start_loc[:b + 1],
            logits_indices=buf.logits_indices[:b], max_query_len=1, max_context_len=self.max_seq_len,
            query_lens=[1] * b, cached_lens=[0] * b)

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.buffers.tokens[:b], self.buffers.positions[:b], self.cache, self._meta(b))

    def _capture_all(self) -> None:
        """Every bucket, largest first, into one memory pool. The buffers hold padding (slot -1,
        context 0) throughout, so neither the warm-up runs nor the captures touch the cache."""
        buf = self.buffers
        buf.host_slot_mapping[:] = -1
        buf.host_context_lens[:] = 0
        buf.upload(buf.max_seqs)
        pool = None
        for b in reversed(self.buckets):
            self._forward(b)  # warm-up: compiles the kernels, settles cuBLAS's workspace
            torch.cuda.synchronize(self.cache.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.cache.device)

    def replay(self, batch: int, bucket: int) -> torch.Tensor:
        """Logits of the decode step prepared in the buffers for `batch` sequences, padded to `bucket`."""
        if not self.capture:
            return self._forward(bucket)[:batch]
        self.graphs[bucket].replay()
        return self.logits[bucket][:batch]

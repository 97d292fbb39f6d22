"""CUDA graphs for decode: one captured forward pass per batch-size bucket, replayed each step.

A decode step of Llama 3 8B launches some 500 kernels; at small batches launching them from
Python takes longer than the GPU takes to run them. A captured graph launches them all at once.
A graph replays fixed shapes at fixed addresses, so (as nano-vllm does):

- each bucket (1, 2, 4, 8, then multiples of 16) is captured once, largest first, all sharing
  one memory pool; a step runs the smallest bucket that holds its batch;
- the step's inputs are copied into static buffers: the block tables at their full width
  (max_seq_len / block_size), padding rows with slot -1 (their K/V are written nowhere, see
  `triton_attention.store_kv`) and a context of 0 (they attend to nothing);
- the Triton kernel is captured for the longest context, max_seq_len, from which it sizes its
  context splits; a split past a sequence's end does no work.

Prefill stays eager: its shapes change every step. Only the Triton backend is captured: the
torch backend plans its decode groups on the host each step, and flash-attn appends K/V itself
at `cache_seqlens`, with no way to skip a padding row.
"""
from __future__ import annotations

import torch

from ..engine.block_manager import KVCache, StepMetadata
from .model import Transformer


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every multiple of 16 up to one that holds `max_batch`."""
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch + 16, 16)) if max_batch > 8 else small + [max_batch]


class DecodeGraphs:
    """Replays decode steps of `model` over `cache` from captured CUDA graphs.

    With `capture=False` the same static-buffer forward runs eagerly: what the graphs replay,
    checkable on a machine without CUDA.
    """

    def __init__(self, model: Transformer, cache: KVCache, max_batch: int, capture: bool = True):
        if cache.backend is None or cache.backend.name != "triton":
            raise ValueError("CUDA graphs need the triton attention backend")
        self.model, self.cache, self.capture = model, cache, capture
        self.buckets = batch_buckets(max_batch)
        n, dev = self.buckets[-1], cache.device
        self.tokens = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros((n, cache.max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def _meta(self, b: int) -> StepMetadata:
        """Metadata over the first `b` rows of the static buffers (host lists: unused by Triton's decode)."""
        return StepMetadata(
            is_prefill=False, slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
            context_lens=self.context_lens[:b], cache_seqlens=self.context_lens[:b],
            context_start_loc=self.query_start_loc[:b + 1], query_start_loc=self.query_start_loc[:b + 1],
            logits_indices=self.logits_indices[:b], max_query_len=1, max_context_len=self.cache.max_seq_len,
            query_lens=[1] * b, cached_lens=[0] * b)

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.tokens[:b], self.positions[:b], self.cache, self._meta(b))

    def _capture_all(self) -> None:
        """Every bucket, largest first, into one memory pool. The buffers hold padding (slot -1,
        context 0) throughout, so neither the warm-up runs nor the captures touch the cache."""
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

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 meta: StepMetadata) -> torch.Tensor:
        """Logits of a decode step (the model's signature): copied in, replayed, the real rows out."""
        assert not meta.is_prefill and cache is self.cache
        b = tokens.shape[0]
        bucket = next(x for x in self.buckets if x >= b)
        self.tokens[:b] = tokens
        self.positions[:b] = positions
        self.slot_mapping[:b] = meta.slot_mapping
        self.slot_mapping[b:bucket] = -1
        self.context_lens[:b] = meta.context_lens
        self.context_lens[b:bucket] = 0
        self.block_tables[:b, :meta.block_tables.shape[1]] = meta.block_tables
        if not self.capture:
            return self._forward(bucket)[:b]
        self.graphs[bucket].replay()
        return self.logits[bucket][:b]

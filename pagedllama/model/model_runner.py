"""The model runner: the model, its KV tensors and attention backend, and each step's inputs.

The engine hands it a step's sequences, the copies and swaps scheduling decided, and the block
manager's host block tables; it applies the copies and swaps, prepares the step's inputs and runs
the forward pass. Inputs are prepared in persistent buffers of fixed width (the block table
padded to the most blocks a sequence can hold), written on the host with numpy (on arrays this
small an op costs a microsecond, a tensor op several) and, on CUDA, copied to the device from
pinned memory so that the copies overlap. Decode steps always use the same buffers at the same
addresses: what capturing them in CUDA graphs needs (cuda_graphs.py, the one addition for that).
"""
from __future__ import annotations

from dataclasses import replace
from operator import attrgetter
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..engine.block_manager import cdiv
from ..engine.config import CacheLayout, EngineConfig
from ..engine.sequence import Sequence
from .attention import AttentionBackend, StepMetadata
from .cuda_graphs import DecodeGraphs
from .kv_cache import KVCache
from .step_buffers import StepBuffers

if TYPE_CHECKING:
    from ..engine.block_manager import BlockOps
    from .model import Transformer


class ModelRunner:
    """Owns the model, the KV tensors and the attention backend; runs one step at a time."""

    def __init__(self, config: EngineConfig, model: Transformer | None, layout: CacheLayout, max_num_seqs: int,
                 backend: AttentionBackend | None):
        """`model` None: only the KV tensors and the step preparation (what attention is tested through)."""
        self.model = model
        self.device = config.device
        self.block_size, self.max_seq_len = layout.block_size, config.max_seq_len
        self.preallocated = layout.preallocated  # decode may read each sequence's row in place
        self.cache = KVCache(config.model_args, layout, backend, config.device, config.dtype,
                             config.swap_blocks(layout), config.tensor_parallel)
        self.max_blocks_per_seq = cdiv(config.max_seq_len, layout.block_size)
        self.decode_buffers = StepBuffers(max_num_seqs, max_num_seqs, self.max_blocks_per_seq, config.device)
        # Decode rows past a step's batch (CUDA graphs run a batch in a larger bucket) are one query each.
        self.decode_buffers.host_query_start_loc[:] = np.arange(max_num_seqs + 1)
        self.decode_buffers.host_logits_indices[:] = np.arange(max_num_seqs)
        self.decode_buffers.upload(max_num_seqs)
        self.prefill_buffers = StepBuffers(config.max_prefill_tokens, max_num_seqs, self.max_blocks_per_seq,
                                           config.device)
        # CUDA graphs: decode replays captured forward passes over `decode_buffers` (on a machine
        # without CUDA the same padded forward runs eagerly, which is how the tests check it).
        self.graphs = None
        if config.cuda_graphs:
            self.graphs = DecodeGraphs(model, self.cache, self.decode_buffers, config.max_seq_len,
                                       capture=config.device.type == "cuda")

    def run(self, seqs: list[Sequence], is_prefill: bool, ops: BlockOps | None,
            block_tables: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply `ops`, then run one step over `seqs`: the logits of each sequence's last token, and each
        sequence's context length (the position of the token they choose), on the device."""
        if ops:
            self.cache.apply(ops)
        if self.graphs is not None and not is_prefill:
            bucket = self.graphs.bucket(len(seqs))
            _, _, meta = self.prepare(seqs, False, block_tables, pad_to=bucket)
            return self.graphs.replay(len(seqs), bucket), meta.context_lens
        tokens, positions, meta = self.prepare(seqs, is_prefill, block_tables)
        return self.model(tokens, positions, self.cache, meta), meta.context_lens

    def prepare(self, seqs: list[Sequence], is_prefill: bool, block_tables: np.ndarray,
                pad_to: int = 0) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        """Input tokens, positions and attention metadata for one step over `seqs`, whose block-table
        rows are in `block_tables` (the block manager's host array).

        Prefill feeds every token not yet cached; decode feeds each sequence's last token. `pad_to`
        (decode): rows up to it write no K/V (slot -1) and attend to nothing (context 0).
        """
        b, bs = len(seqs), self.block_size
        token_ids = [s.token_ids for s in seqs]
        context_lens = np.fromiter(map(len, token_ids), np.int64, b)
        if is_prefill:
            cached = np.fromiter((s.num_cached_tokens for s in seqs), np.int64, b)
            tokens = [t for ids, c in zip(token_ids, cached.tolist()) for t in ids[c:]]
        else:
            cached = context_lens - 1
            tokens = [ids[-1] for ids in token_ids]
        t = len(tokens)
        buf = self._buffers(is_prefill, t)
        query_lens = context_lens - cached
        query_start_loc = np.zeros(b + 1, np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])
        context_start_loc = np.zeros(b + 1, np.int64)
        np.cumsum(context_lens, out=context_start_loc[1:])
        if is_prefill:  # each sequence's positions run from its cached length up
            token_seq = np.repeat(np.arange(b), query_lens)
            positions = np.arange(t) - (query_start_loc[:-1] - cached)[token_seq]
        else:
            token_seq, positions = np.arange(b), cached
        rows = np.fromiter(map(attrgetter("row"), seqs), np.intp, b)
        tables = buf.host_block_tables[:b]
        np.take(block_tables, rows, axis=0, out=tables)
        buf.host_tokens[:t] = tokens
        buf.host_positions[:t] = positions
        buf.host_slot_mapping[:t] = tables[token_seq, positions // bs].astype(np.int64) * bs + positions % bs
        buf.host_logits_indices[:b] = query_start_loc[1:] - 1
        buf.host_context_lens[:b] = context_lens
        buf.host_cache_seqlens[:b] = cached
        buf.host_context_start_loc[:b + 1] = context_start_loc
        buf.host_query_start_loc[:b + 1] = query_start_loc
        buf.host_slot_mapping[b:pad_to] = -1
        buf.host_context_lens[b:pad_to] = 0
        buf.upload(max(b, pad_to))
        meta = StepMetadata(
            is_prefill=is_prefill,
            slot_mapping=buf.slot_mapping[:t],
            block_tables=buf.block_tables[:b],
            context_lens=buf.context_lens[:b],
            cache_seqlens=buf.cache_seqlens[:b],
            context_start_loc=buf.context_start_loc[:b + 1],
            query_start_loc=buf.query_start_loc[:b + 1],
            logits_indices=buf.logits_indices[:b],
            max_query_len=int(query_lens.max()),
            max_context_len=int(context_lens.max()),
            query_lens=query_lens.tolist(),
            cached_lens=cached.tolist(),
            preallocated_rows=tables[:, 0].tolist() if self.preallocated else None,
        )
        return buf.tokens[:t], buf.positions[:t], meta

    def _buffers(self, is_prefill: bool, num_tokens: int) -> StepBuffers:
        """The decode buffers, or the prefill ones, grown when a step has more tokens than they hold
        (a request's first prefill may exceed the prefill budget: it is never split)."""
        if not is_prefill:
            return self.decode_buffers
        buf = self.prefill_buffers
        if num_tokens > buf.max_tokens:
            buf = self.prefill_buffers = StepBuffers(num_tokens + num_tokens // 4, buf.max_seqs,
                                                     self.max_blocks_per_seq, self.device)
        return buf


def warmup_forward(config: EngineConfig, model: Transformer, backend: AttentionBackend, block_size: int) -> int:
    """A forward over the largest prefill step through the backend and block size that will run, in a
    throwaway cache just large enough; returns that cache's size in bytes."""
    tokens = min(config.max_prefill_tokens, config.max_seq_len - 1)
    layout = CacheLayout(block_size, cdiv(tokens + 1, block_size))
    runner = ModelRunner(replace(config, cuda_graphs=False, preemption="recompute"), model, layout, 1, backend)
    seq = Sequence(0, "warmup", [0] * tokens, tokens, 1, row=0)
    tables = np.zeros((1, runner.max_blocks_per_seq), dtype=np.int32)
    tables[0, :layout.num_blocks] = np.arange(layout.num_blocks)
    runner.run([seq], True, None, tables)
    return runner.cache.kv.numel() * runner.cache.kv.element_size()


def warmup_peak_bytes(config: EngineConfig, model: Transformer, backend: AttentionBackend, block_size: int) -> int:
    """Peak CUDA memory of `warmup_forward`, less its throwaway cache: what sizes the CUDA budget."""
    torch.cuda.reset_peak_memory_stats(config.device)
    kv_bytes = warmup_forward(config, model, backend, block_size)
    torch.cuda.empty_cache()
    return torch.cuda.max_memory_allocated(config.device) - kv_bytes

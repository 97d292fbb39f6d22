"""The torch attention backend as it was before each step of the speed work of issue 6, kept to
measure that work side by side with the package's current one (same process, same contexts).

`PaddedTorchAttention`, the first version: decode gathered every sequence's K/V padded to the
batch's longest context and ran one masked SDPA over it, so its cost was batch x longest
context; prefill called SDPA on 3-D (H, L, D) tensors, which PyTorch's CPU build runs with its
unfused math kernel.

`SplitKTorchAttention`, the second: decode cut every context into 16-slot chunks, gathered them
(into kept scratch buffers), ran a softmax per chunk with two batched matmuls and merged each
sequence's chunks by their log-sum-exp (split-K). Its work was the sum of the contexts, but in
thousands of tiny matmuls.

Then: decode groups sequences of similar context length and runs one padded SDPA per group
(see attention.TorchAttention). `PerHeadGqaTorchAttention` is that grouped decode as first
written: every query head its own single-row query, SDPA's `enable_gqa` mapping it to its KV
head, in every dtype. Now, in float32, the query heads of a KV head are the rows of one query.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedllama.model.attention import TorchAttention, gather_kv, plan_decode_groups, sdpa_per_head, write_kv

CHUNK = 16


class PaddedTorchAttention(TorchAttention):
    name = "torch (before: padded decode, 3-D prefill)"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if meta.is_prefill:
            return self._prefill_3d(q, k, v, k_cache, v_cache, meta, scale)
        keys = gather_kv(k_cache, meta.block_tables, meta.max_context_len).transpose(1, 2)
        values = gather_kv(v_cache, meta.block_tables, meta.max_context_len).transpose(1, 2)
        valid = torch.arange(meta.max_context_len, device=q.device) < meta.context_lens[:, None]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=valid[:, None, None, :],
                                             scale=scale, enable_gqa=True)
        return out.squeeze(2)

    @staticmethod
    def _prefill_3d(q, k, v, k_cache, v_cache, meta, scale):
        out = torch.empty_like(q)
        start = 0
        for i, (q_len, cached) in enumerate(zip(meta.query_lens, meta.cached_lens)):
            end = start + q_len
            qi = q[start:end].transpose(0, 1)
            if cached == 0:
                ki, vi = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
                oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
            else:
                ctx = cached + q_len
                ki = gather_kv(k_cache, meta.block_tables[i:i + 1], ctx)[0].transpose(0, 1)
                vi = gather_kv(v_cache, meta.block_tables[i:i + 1], ctx)[0].transpose(0, 1)
                mask = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(diagonal=cached)
                oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start:end] = oi.transpose(0, 1)
            start = end
        return out


@dataclass
class DecodeChunks:
    seq: torch.Tensor  # (N,) int64: the sequence each chunk belongs to
    index: torch.Tensor  # (N,) int64: the chunk in the cache viewed as (-1, CHUNK, Hkv, D)
    valid: torch.Tensor  # (N, CHUNK) bool: slots inside the context


def plan_decode_chunks(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> DecodeChunks:
    assert block_size % CHUNK == 0, "the split-K baseline needs a block size that is a multiple of 16"
    num_chunks = (context_lens.long() + CHUNK - 1) // CHUNK
    seq = torch.repeat_interleave(torch.arange(len(context_lens), device=context_lens.device), num_chunks)
    first = torch.cumsum(num_chunks, 0) - num_chunks
    pos = (torch.arange(len(seq), device=seq.device) - first[seq]) * CHUNK
    slot = block_tables[seq, pos // block_size].long() * block_size + pos % block_size
    valid = pos[:, None] + torch.arange(CHUNK, device=seq.device) < context_lens[seq][:, None]
    return DecodeChunks(seq, slot // CHUNK, valid)


def merge_chunks(m, l, o, seq, batch):
    seq_max = torch.full((batch, *m.shape[1:]), float("-inf"), device=m.device)
    seq_max.scatter_reduce_(0, seq.view(-1, *[1] * (m.dim() - 1)).expand_as(m), m, "amax")
    weight = torch.exp(m - seq_max[seq])
    denom = torch.zeros_like(seq_max).index_add_(0, seq, weight * l)
    out = torch.zeros(batch, *o.shape[1:], device=o.device).index_add_(0, seq, weight[..., None] * o)
    return out / denom[..., None]


class SplitKTorchAttention(TorchAttention):
    name = "torch (before: split-K over 16-slot chunks)"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        if meta.is_prefill:
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if getattr(self, "_planned_for", None) is not meta:  # once per step, as the package did
            self._planned_for, self._chunks = meta, plan_decode_chunks(meta.block_tables, meta.context_lens,
                                                                       k_cache.shape[1])
        return self._split_k(q, k_cache, v_cache, self._chunks, scale)

    def _split_k(self, q, k_cache, v_cache, chunks: DecodeChunks, scale: float) -> torch.Tensor:
        batch, n_heads, head_dim = q.shape
        n_kv_heads, group, n = k_cache.shape[2], n_heads // k_cache.shape[2], len(chunks.index)
        shape = (batch, n_kv_heads, group)

        def scratch(name, *dims):
            return self.workspace.get(name, dims, q.dtype, q.device)

        keys, values = (torch.index_select(c.view(-1, CHUNK, n_kv_heads, head_dim).transpose(1, 2), 0, chunks.index,
                                           out=scratch(name, n, n_kv_heads, CHUNK, head_dim))
                        for name, c in (("keys", k_cache), ("values", v_cache)))
        queries = torch.index_select(q.view(*shape, head_dim), 0, chunks.seq,
                                     out=scratch("queries", n, n_kv_heads, group, head_dim))
        scores = torch.bmm(queries.view(-1, group, head_dim), keys.view(-1, CHUNK, head_dim).transpose(1, 2),
                           out=scratch("scores", n * n_kv_heads, group, CHUNK))
        scores = scores.view(n, n_kv_heads, group, CHUNK).float().mul_(scale)
        scores.masked_fill_(~chunks.valid[:, None, None, :], float("-inf"))
        m = scores.amax(-1)
        p = torch.exp(scores - m[..., None])
        l = p.sum(-1)
        o = torch.bmm(p.to(values.dtype).view(-1, group, CHUNK), values.view(-1, CHUNK, head_dim),
                      out=scratch("o", n * n_kv_heads, group, head_dim)).view(n, n_kv_heads, group, head_dim).float()
        return merge_chunks(m, l, o, chunks.seq, batch).view(batch, n_heads, head_dim).to(q.dtype)


class PerHeadGqaTorchAttention(TorchAttention):
    name = "torch (before: a single-row query per head in float32 too)"

    def _decode_sdpa(self, q, keys, values, mask, scale):
        return sdpa_per_head(q, keys, values, mask, scale)



class GatheringTorchAttention(TorchAttention):
    name = "torch (before: naive rows gathered too)"

    def _decode_plan(self, meta):
        if self._planned is None or self._planned[0] is not meta:
            lens = [c + q for c, q in zip(meta.cached_lens, meta.query_lens)]
            self._planned = meta, plan_decode_groups(lens, meta.block_tables)  # no rows: every group gathered
        return self._planned[1]

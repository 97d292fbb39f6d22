"""The torch attention backend as it was before each step of the speed work of issue 6, kept to
measure that work side by side with the package's current one (same process, same contexts).

`FreshTensorsTorchAttention`: the split-K decode before its scratch buffers (attention.Workspace):
every layer's gathered K/V and matmul outputs were fresh tensors.

Before: decode gathered every sequence's K/V padded to the batch's longest context and ran
one masked SDPA over it, so its cost was batch x longest context; prefill called SDPA on 3-D
(H, L, D) tensors, which PyTorch's CPU build runs with its unfused math kernel. Now: decode
is split-K over 16-slot chunks (cost: the sum of the contexts) and prefill passes 4-D tensors,
which take the fused flash kernel. See attention.TorchAttention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllama.attention import TorchAttention, gather_kv, merge_chunks, write_kv


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


class FreshTensorsTorchAttention(TorchAttention):
    name = "torch (before: fresh tensors every layer)"

    def _decode(self, q, k_cache, v_cache, chunks, scale):
        batch, n_heads, head_dim = q.shape
        n_kv_heads = k_cache.shape[2]
        shape = (batch, n_kv_heads, n_heads // n_kv_heads)
        keys = k_cache.view(-1, chunks.size, n_kv_heads, head_dim).transpose(1, 2).index_select(0, chunks.index)
        values = v_cache.view(-1, chunks.size, n_kv_heads, head_dim).transpose(1, 2).index_select(0, chunks.index)
        queries = q.view(*shape, head_dim).index_select(0, chunks.seq)
        scores = torch.matmul(queries, keys.transpose(-1, -2)).float().mul_(scale)
        scores.masked_fill_(~chunks.valid[:, None, None, :], float("-inf"))
        m = scores.amax(-1)
        p = torch.exp(scores - m[..., None])
        l, o = p.sum(-1), torch.matmul(p.to(values.dtype), values).float()
        return merge_chunks(m, l, o, chunks.seq, batch).view(batch, n_heads, head_dim).to(q.dtype)

"""Experimental decode attention for the torch backend, to measure a proposed package change.

Not used by the package. The torch backend's decode path (attention.TorchAttention) gathers every
sequence's K/V padded to the longest context of the batch, then runs SDPA with a mask. Its cost
is batch x longest context, not the sum of the contexts: with ShareGPT's long tail, one long
request makes every request in the batch pay for its length, and the paged twin, whose point is
running large batches, pays the most.

`BucketedTorchAttention` groups the batch's sequences by context length (each group's shortest at
least `ratio` of its longest) and runs the same gather + masked SDPA once per group, so padding
waste is bounded by 1/ratio and the number of extra ops by the number of groups (a handful).
`PerSequenceTorchAttention` is the extreme: one unpadded gather + SDPA per sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllama.attention import TorchAttention, gather_kv, write_kv


def length_groups(lens: list[int], ratio: float) -> list[tuple[list[int], int]]:
    """Rows sorted by length, cut into groups whose shortest is >= ratio x longest; (rows, longest)."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    groups: list[tuple[list[int], int]] = []
    for i in order:
        if groups and lens[i] >= ratio * groups[-1][1]:
            groups[-1][0].append(i)
        else:
            groups.append(([i], lens[i]))
    return groups


class BucketedTorchAttention(TorchAttention):
    name = "torch-bucketed"

    def __init__(self, ratio: float = 0.5):
        self.ratio = ratio

    def _plan(self, meta, device):
        plan = getattr(meta, "_bench_groups", None)
        if plan is None:
            lens = [c + 1 for c in meta.cached_lens]  # decode: one new token per sequence
            plan = []
            for rows, longest in length_groups(lens, self.ratio):
                idx = torch.tensor(sorted(rows), device=device)  # one group: the identity, used as is
                plan.append((idx, longest, meta.block_tables.index_select(0, idx),
                             (torch.arange(longest, device=device) < meta.context_lens.index_select(0, idx)[:, None])
                             [:, None, None, :]))
            meta._bench_groups = plan  # built once per step, shared by all layers
        return plan

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        if meta.is_prefill:
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        plan = self._plan(meta, q.device)
        if len(plan) == 1:
            idx, longest, tables, mask = plan[0]
            return self._attend(q.unsqueeze(2), k_cache, v_cache, tables, longest, mask, scale).squeeze(2)
        out = torch.empty_like(q)
        for idx, longest, tables, mask in plan:
            o = self._attend(q.index_select(0, idx).unsqueeze(2), k_cache, v_cache, tables, longest, mask, scale)
            out.index_copy_(0, idx, o.squeeze(2))
        return out

    @staticmethod
    def _attend(q, k_cache, v_cache, tables, length, mask, scale):
        keys = gather_kv(k_cache, tables, length).transpose(1, 2)
        values = gather_kv(v_cache, tables, length).transpose(1, 2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


class PerSequenceTorchAttention(TorchAttention):
    name = "torch-per-sequence"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        if meta.is_prefill:
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        for i, cached in enumerate(meta.cached_lens):
            n = cached + 1
            tables = meta.block_tables[i:i + 1]
            keys = gather_kv(k_cache, tables, n)[0].transpose(0, 1)
            values = gather_kv(v_cache, tables, n)[0].transpose(0, 1)
            out[i] = F.scaled_dot_product_attention(q[i][:, None], keys, values, scale=scale,
                                                    enable_gqa=True)[:, 0]
        return out

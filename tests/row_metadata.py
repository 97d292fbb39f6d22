"""Decode-step metadata for sequences that each own one preallocated row: what the attention tests
and bench/naive_views.py hand a backend without a model runner."""
from __future__ import annotations

import torch

from pagedllama.model.attention import StepMetadata


def decode_meta(rows: list[int], lens: list[int], row_slots: int, preallocated: bool) -> StepMetadata:
    """A decode step over sequences in `rows` (one row each) with contexts `lens`, this step's token
    the last of each; `preallocated`: the rows are the naive twin's (decode may read them in place)."""
    b = len(rows)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    starts = torch.zeros(b + 1, dtype=torch.int32)
    starts[1:] = torch.cumsum(lens_t, 0)
    return StepMetadata(
        is_prefill=False, slot_mapping=torch.tensor(rows) * row_slots + lens_t.long() - 1,
        block_tables=torch.tensor(rows, dtype=torch.int32)[:, None], context_lens=lens_t, cache_seqlens=lens_t - 1,
        context_start_loc=starts, query_start_loc=torch.arange(b + 1, dtype=torch.int32),
        logits_indices=torch.arange(b), max_query_len=1, max_context_len=max(lens), query_lens=[1] * b,
        cached_lens=[n - 1 for n in lens], preallocated_rows=rows if preallocated else None)

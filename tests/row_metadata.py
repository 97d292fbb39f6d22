"""Decode-step metadata without a model runner: what the attention tests, bench/naive_views.py and
bench/gpu.py's kernel part hand a backend."""
from __future__ import annotations

import torch

from pagedllama.model.attention import StepMetadata


def decode_metadata(block_tables: torch.Tensor, lens: list[int], block_size: int,
                    preallocated_rows: list[int] | None = None) -> StepMetadata:
    """A decode step over sequences with these block tables (B, blocks) and contexts `lens`, this
    step's token the last of each; `preallocated_rows`: the naive twin's rows (read in place)."""
    b, device = len(lens), block_tables.device
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    last = lens_t.long() - 1
    starts = torch.zeros(b + 1, dtype=torch.int32, device=device)
    starts[1:] = torch.cumsum(lens_t, 0)
    slots = block_tables.long().gather(1, (last // block_size)[:, None])[:, 0] * block_size + last % block_size
    return StepMetadata(
        is_prefill=False, slot_mapping=slots, block_tables=block_tables.int(), context_lens=lens_t,
        cache_seqlens=lens_t - 1, context_start_loc=starts,
        query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=device),
        logits_indices=torch.arange(b, device=device), max_query_len=1, max_context_len=max(lens),
        query_lens=[1] * b, cached_lens=[n - 1 for n in lens], preallocated_rows=preallocated_rows)


def decode_meta(rows: list[int], lens: list[int], row_slots: int, preallocated: bool) -> StepMetadata:
    """The same over sequences in `rows`, one row (one `row_slots`-slot block) each; `preallocated`:
    the rows are the naive twin's (decode may read them in place)."""
    return decode_metadata(torch.tensor(rows, dtype=torch.int32)[:, None], lens, row_slots,
                           rows if preallocated else None)

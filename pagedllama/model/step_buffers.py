"""One step's inputs in persistent buffers: host staging written through numpy, and the device copy."""
from __future__ import annotations

import numpy as np
import torch


class StepBuffers:
    """One step's inputs at fixed addresses, for up to `max_tokens` tokens of `max_seqs` sequences:
    host staging (pinned on CUDA) written through numpy views, and the device tensors the forward
    pass reads (on CPU the same memory, so nothing is copied)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device):
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        pin = device.type == "cuda"
        t, s = max_tokens, max_seqs
        host = [torch.zeros(3 * t + s, dtype=torch.int64, pin_memory=pin),  # tokens, positions, slots, logits rows
                torch.zeros(4 * s + 2, dtype=torch.int32, pin_memory=pin),  # the per-sequence lengths
                torch.zeros((s, max_blocks_per_seq), dtype=torch.int32, pin_memory=pin)]
        self._host = host
        self._device = [x.to(device) for x in host] if pin else host
        i64, i32, self.block_tables = self._device
        self.tokens, self.positions, self.slot_mapping, self.logits_indices = i64.split([t, t, t, s])
        self.context_lens, self.cache_seqlens, self.context_start_loc, self.query_start_loc = \
            i32.split([s, s, s + 1, s + 1])
        h64, h32, self.host_block_tables = (x.numpy() for x in host)
        self.host_tokens, self.host_positions, self.host_slot_mapping, self.host_logits_indices = \
            np.split(h64, [t, 2 * t, 3 * t])
        self.host_context_lens, self.host_cache_seqlens, self.host_context_start_loc, self.host_query_start_loc = \
            np.split(h32, [s, 2 * s, 3 * s + 1])

    def upload(self, rows: int) -> None:
        """Copy the staging to the device (asynchronous from pinned memory), block tables for `rows` sequences.

        The next step writes the staging again only after this step's sampling has read its tokens
        back to the host, which waits for the GPU, so no copy is still pending then."""
        if self._device is self._host:  # CPU: the forward pass reads the staging itself
            return
        for dev, host in zip(self._device[:2], self._host[:2]):
            dev.copy_(host, non_blocking=True)
        self._device[2][:rows].copy_(self._host[2][:rows], non_blocking=True)

"""Automatic prefix caching: full KV blocks found by their content, so equal prefixes share K/V.

A full block's hash covers its own tokens and, through its parent block's hash, every
token before them: equal hashes mean equal prefixes, hence equal K/V (Python's 64-bit
tuple hash, deterministic for ints; collisions are assumed away). A block stays
findable after its last holder frees it, until the allocator hands it out again; since
the allocator reuses free blocks in the order they were freed, cached blocks are evicted
least recently used first.
"""
from __future__ import annotations

from .sequence import Sequence


class PrefixCache:
    """Maps the hash of a full block's prefix to the physical block holding its K/V."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._block_of: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self.queried_tokens = 0  # tokens of every admitted sequence
        self.hit_tokens = 0  # of which were found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def hashes(self, seq: Sequence) -> list[int]:
        """The hash of each of `seq`'s full blocks, each computed once (tokens are only ever appended)."""
        bs, hashes = self.block_size, seq.block_hashes
        for i in range(len(hashes), seq.num_tokens // bs):
            hashes.append(hash((hashes[-1] if hashes else 0, tuple(seq.token_ids[i * bs:(i + 1) * bs]))))
        return hashes

    def lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks of `seq`'s longest cached prefix, leaving at least its last token to compute.

        The last token's logits are what the prefill is for, so its block is never taken.
        """
        blocks = []
        for h in self.hashes(seq)[:(seq.num_tokens - 1) // self.block_size]:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def register(self, seq: Sequence, start: int, end: int) -> None:
        """Make `seq`'s full blocks start..end-1 findable (their K/V are computed in this step)."""
        hashes = self.hashes(seq)
        for i in range(start, end):
            if hashes[i] not in self._block_of:
                self._block_of[hashes[i]] = seq.block_table[i]
                self._hash_of[seq.block_table[i]] = hashes[i]

    def evict(self, block: int) -> None:
        """`block` is about to be overwritten: forget what it held."""
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._block_of[h]

    def summary(self) -> dict:
        return {"hit_rate": self.hit_rate, "cached_tokens": self.hit_tokens, "prompt_tokens": self.queried_tokens}

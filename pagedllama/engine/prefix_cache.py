"""Automatic prefix caching: full KV blocks found by their content, so equal prefixes share K/V.

A full block is found by its prefix: its own tokens and every token before them. Each cached
prefix gets an id that is never reused, and is keyed by (its parent prefix's id, the block's
tokens). A dict compares keys by equality after their hash, so a hit means the very same
tokens after the very same prefix, never merely an equal hash. A block stays findable after
its last holder frees it, until the allocator hands it out again; since the allocator reuses
free blocks in the order they were freed, cached blocks are evicted least recently used first.
"""
from __future__ import annotations

import itertools

from .sequence import Sequence

ROOT = 0  # the parent id of every sequence's first block
PrefixKey = tuple[int, tuple[int, ...]]  # (parent prefix id, the block's tokens)


class PrefixCache:
    """Maps each cached prefix to the physical block holding its last block's K/V."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._id_of: dict[PrefixKey, int] = {}
        self._block_of: dict[int, int] = {}  # prefix id -> block
        self._entry_of: dict[int, tuple[PrefixKey, int]] = {}  # block -> its key and prefix id
        self._new_ids = itertools.count(ROOT + 1)
        self.queried_tokens = 0  # tokens of every admitted sequence
        self.hit_tokens = 0  # of which were found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def _tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])

    def lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks of `seq`'s longest cached prefix, leaving at least its last token to compute.

        The last token's logits are what the prefill is for, so its block is never taken.
        """
        blocks, parent = [], ROOT
        for i in range((seq.num_tokens - 1) // self.block_size):
            prefix = self._id_of.get((parent, self._tokens(seq, i)))
            if prefix is None:
                break
            blocks.append(self._block_of[prefix])
            parent = prefix
        return blocks

    def register(self, seq: Sequence, end: int) -> None:
        """Make `seq`'s full blocks before `end` findable (their K/V are computed by this step at
        the latest). `seq.prefix_ids` remembers each block's prefix id, so each is keyed once; a
        prefix cached already keeps its block, and `seq`'s copy stays its own."""
        ids = seq.prefix_ids
        for i in range(len(ids), end):
            key = (ids[-1] if ids else ROOT, self._tokens(seq, i))
            prefix = self._id_of.get(key)
            if prefix is None:
                prefix = next(self._new_ids)
                block = seq.block_table[i]
                self._id_of[key], self._block_of[prefix], self._entry_of[block] = prefix, block, (key, prefix)
            ids.append(prefix)

    def evict(self, block: int) -> None:
        """`block` is about to be overwritten: forget what it held."""
        entry = self._entry_of.pop(block, None)
        if entry is not None:
            key, prefix = entry
            del self._id_of[key], self._block_of[prefix]

    def summary(self) -> dict:
        return {"hit_rate": self.hit_rate, "cached_tokens": self.hit_tokens, "prompt_tokens": self.queried_tokens}

"""Tensor parallelism, Megatron-style: which slice of each weight a rank holds, and the collectives.

A rank holds 1/N of the query and KV heads (wq, wk, wv by output rows, wo by input columns) and
1/N of SwiGLU's hidden units (w1, w3 by rows, w2 by columns): each block's attention and MLP end
in one all-reduce of their partial outputs. The embedding and the output layer are split by
vocabulary (docs/tensor-parallel.md says why, not replicated): a rank embeds the ids in its range
(zeros elsewhere, then an all-reduce) and computes its slice of the logits (then an all-gather).
Meta's `consolidated.NN.pth` files are exactly these slices for N = the number of files.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UsageError
from .config import ModelArgs

# How a weight (by its Meta name's second-to-last part) is cut: 0 by output rows, 1 by input
# columns; a name not listed (the norms) is the same on every rank.
SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among the ranks: `rank` of `size` (size 1: no collectives at all), of which
    `local_size` run on this machine (and share its memory)."""

    rank: int = 0
    size: int = 1
    local_size: int = 1

    def part(self, n: int) -> slice:
        """This rank's range of `n` rows (heads, hidden units, vocabulary ids)."""
        step = n // self.size
        return slice(self.rank * step, (self.rank + 1) * step)

    def shard(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full tensor `key` of a Meta-named state dict."""
        dim = SHARD_DIM.get(key.split(".")[-2])
        if self.size == 1 or dim is None or not key.endswith(".weight"):
            return t
        return t.narrow(dim, self.rank * (t.shape[dim] // self.size), t.shape[dim] // self.size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (a row-parallel layer's partial outputs), in place."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's (rows, n) slice side by side: (rows, N x n), rank 0's first."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def from_rank0(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank: what was sampled, so that the ranks can never diverge."""
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x


SINGLE = TensorParallel()


def check_divides(args: ModelArgs, size: int) -> None:
    """Every rank holds whole heads, an equal share of the hidden units and of the vocabulary."""
    for what, n in (("KV heads", args.n_kv_heads), ("query heads", args.n_heads),
                    ("FFN hidden units", args.hidden_dim), ("vocabulary entries", args.vocab_size)):
        if n % size:
            sizes = ", ".join(str(k) for k in range(1, args.n_kv_heads + 1)
                              if not (args.n_kv_heads % k or args.n_heads % k or args.hidden_dim % k
                                      or args.vocab_size % k))
            raise UsageError(f"--tensor-parallel-size {size} does not divide the model's {n} {what}; "
                             f"use one of {sizes}")

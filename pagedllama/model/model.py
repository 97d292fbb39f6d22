"""The Llama 3 transformer, over a flat batch of tokens from many sequences.

Tokens of all sequences in a step are packed into one (T, dim) tensor, so prefill of
prompts of different lengths is one pass with no padding, and decode is the case T = B.
Attention reads and writes K/V only through the `KVCache` it is handed, whose layout is the one
thing the naive and paged twins do differently.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs, RopeScaling
from .parallel import SINGLE, TensorParallel

if TYPE_CHECKING:
    from .attention import StepMetadata
    from .kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 for the statistics, as Meta's reference does: bf16 loses the small variances.
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Rotation speed of each (even, odd) channel pair, with Llama 3.1's long-context scaling."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return freqs.float()
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / scaling.factor,
                         torch.where(wavelen < high_wavelen, freqs, blended))
    return scaled.float()


def rope_freqs_cis(args: ModelArgs, max_positions: int, device: torch.device | str) -> torch.Tensor:
    """(max_positions, head_dim/2) complex64 table of e^(i * position * frequency)."""
    with torch.device("cpu"):  # real numbers even while the model is built on the meta device
        freqs = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
        if args.rope_freq_factors is not None:  # a GGUF's rope_freqs: llama.cpp divides by them
            freqs = freqs / torch.tensor(args.rope_freq_factors, dtype=torch.float32)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), freqs)
        return torch.polar(torch.ones_like(angles), angles).to(device)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, D) by freqs_cis (T, D/2): each interleaved channel pair (Meta's layout)
    is one complex number, so the rotation is one complex multiply (on CPU several times faster
    than the same rotation written with real cos and sin over strided halves)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * freqs_cis[:, None, :]).flatten(-2).type_as(x)


class Attention(nn.Module):
    """This rank's query and KV heads (all of them with one rank); `wo` sums the ranks' outputs."""

    def __init__(self, args: ModelArgs, layer_id: int, tp: TensorParallel):
        super().__init__()
        self.layer_id, self.tp = layer_id, tp
        self.n_heads, self.n_kv_heads = args.n_heads // tp.size, args.n_kv_heads // tp.size
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: KVCache, meta: StepMetadata) -> torch.Tensor:
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim))
        k = self.wk(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        out = cache.attend(self.layer_id, q, k, v, meta)
        return self.tp.all_reduce(self.wo(out.flatten(-2)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), over this rank's share of the hidden units."""

    def __init__(self, dim: int, hidden_dim: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        hidden_dim //= tp.size
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, tp: TensorParallel):
        super().__init__()
        self.attention = Attention(args, layer_id, tp)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, tp)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: KVCache, meta: StepMetadata) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, cache, meta)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 3 with Meta's parameter names, so a `consolidated.pth` state dict loads as is (with `tp`,
    a `consolidated.NN.pth` shard: this rank's slice of every matrix, model/parallel.py)."""

    def __init__(self, args: ModelArgs, max_positions: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.args, self.tp = args, tp
        self.vocab = tp.part(args.vocab_size)  # the ids this rank embeds and scores
        self.tok_embeddings = nn.Embedding(args.vocab_size // tp.size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i, tp) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size // tp.size, bias=False)
        # A plain attribute, not a buffer: it must stay complex64 when the weights go to bf16.
        # The loader puts it on the model's device (checkpoint.build_model).
        self.rope = rope_freqs_cis(args, max_positions, "cpu")

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                meta: StepMetadata) -> torch.Tensor:
        """Logits (float32) at `meta.logits_indices`: one row per sequence, its last token."""
        h = self.tok_embeddings(tokens) if self.tp.size == 1 else self._embed_vocab_slice(tokens)
        freqs_cis = self.rope[positions]
        for layer in self.layers:
            h = layer(h, freqs_cis, cache, meta)
        h = self.norm(h[meta.logits_indices])
        return self.tp.gather_columns(self.output(h).float())

    def _embed_vocab_slice(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings of the ids in this rank's range, zeros for the others, summed over the ranks."""
        local = tokens - self.vocab.start
        outside = (local < 0) | (local >= self.vocab.stop - self.vocab.start)
        h = self.tok_embeddings(local.masked_fill(outside, 0)).masked_fill(outside[:, None], 0)
        return self.tp.all_reduce(h)

"""The model's forward pass with no cache: the ground truth the engine's cached steps must match.

It reuses the model's own RoPE, RMSNorm and FFN and recomputes everything with a plain causal
mask, so comparing with it checks the cache, the block tables and attention, quickly; that the
model is Llama 3 is checked against the independent float64 reference (llama_reference.py).
Shared by the tests and bench/gpu.py, not carried by the package.
"""
from __future__ import annotations

import math

import torch

from pagedllama.model.model import Transformer, apply_rope


@torch.inference_mode()
def full_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """(B, S) tokens -> (B, S, vocab) float32 logits."""
    B, S = tokens.shape
    x = model.tok_embeddings(tokens)
    freqs_cis = model.rope[:S]
    for layer in model.layers:
        a = layer.attention
        h = layer.attention_norm(x)
        q = a.wq(h).unflatten(-1, (a.n_heads, a.head_dim))
        k = a.wk(h).unflatten(-1, (a.n_kv_heads, a.head_dim))
        v = a.wv(h).unflatten(-1, (a.n_kv_heads, a.head_dim))
        q = torch.stack([apply_rope(q[b], freqs_cis) for b in range(B)])
        k = torch.stack([apply_rope(k[b], freqs_cis) for b in range(B)])
        rep = a.n_heads // a.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(a.head_dim)
        mask = torch.ones(S, S, dtype=torch.bool, device=tokens.device).tril()
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).type_as(x)
        x = x + a.wo(out.flatten(-2))
        x = x + layer.feed_forward(layer.ffn_norm(x))
    return model.output(model.norm(x)).float()

"""Llama 3 written out again from its published formulas, in float64, sharing no code with the package.

The tests' ground truth for the model's mathematics. `full_forward` (full_forward.py) reuses the
model's own RMSNorm, RoPE and SwiGLU, so a mistake in one of those would be in it too; this module
imports nothing from `pagedllama`. It reads a Hugging Face `config.json` (as a dict, in either the
transformers 4 style, `rope_theta` and `rope_scaling`, or the transformers 5 style,
`rope_parameters`) and a state dict in Meta's names and interleaved RoPE layout:

- RMSNorm: x / sqrt(mean(x^2) + eps), times its weight.
- RoPE: channels (2i, 2i+1) of every head turned by position * f_i, f_i = theta^(-2i/D), with
  Llama 3.1's long-context rule applied to each f_i (see `rope_frequency`).
- Attention: head by head, query head h reading KV head h // (n_heads / n_kv_heads), causal.
- SwiGLU: w2(silu(w1 x) * w3 x). Output: the embedding matrix when the config ties them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Hyper:
    """What the formulas need from a config.json."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    theta: float
    scaling: dict | None  # Llama 3.1's rope_type "llama3" fields, or None
    tied: bool


def read_config(cfg: dict) -> Hyper:
    """A config.json of either transformers style."""
    if "rope_parameters" in cfg:  # transformers 5: theta and scaling in one dict
        rope = dict(cfg["rope_parameters"])
        theta = rope.pop("rope_theta")
        scaling = rope if rope.get("rope_type") == "llama3" else None
    else:  # transformers 4
        theta, scaling = cfg["rope_theta"], cfg.get("rope_scaling")
    if scaling is not None:
        assert scaling["rope_type"] == "llama3", scaling
    heads = cfg["num_attention_heads"]
    return Hyper(cfg["num_hidden_layers"], heads, cfg["num_key_value_heads"],
                 cfg.get("head_dim") or cfg["hidden_size"] // heads, cfg["rms_norm_eps"], theta, scaling,
                 cfg.get("tie_word_embeddings", False))


def rope_frequency(i: int, head_dim: int, theta: float, scaling: dict | None) -> float:
    """Rotation speed of channel pair i. Llama 3.1 slows the pairs whose wavelength is long
    against the original context: by `factor` past original/low_freq_factor positions, not at all
    below original/high_freq_factor, and in between by a linear blend in original/wavelength."""
    freq = theta ** (-2 * i / head_dim)
    if scaling is None:
        return freq
    original = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    turns = original * freq / (2 * math.pi)  # original / wavelength: turns within the original context
    if turns < low:
        return freq / scaling["factor"]
    if turns > high:
        return freq
    smooth = (turns - low) / (high - low)
    return (1 - smooth) * freq / scaling["factor"] + smooth * freq


def rotate_pairs(x: torch.Tensor, hp: Hyper) -> torch.Tensor:
    """x (S, heads, D) at positions 0..S-1: each channel pair (2i, 2i+1) turned by position * f_i."""
    seq_len, _, dim = x.shape
    freqs = torch.tensor([rope_frequency(i, dim, hp.theta, hp.scaling) for i in range(dim // 2)],
                         dtype=torch.float64)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs  # (S, D/2)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def reference_logits(sd: dict[str, torch.Tensor], cfg: dict, tokens: list[int]) -> torch.Tensor:
    """(S, vocab) float64 logits of one sequence, every position attending to itself and all before."""
    hp = read_config(cfg)
    w = {k: v.double() for k, v in sd.items()}
    seq_len, hd = len(tokens), hp.head_dim
    per_kv = hp.n_heads // hp.n_kv_heads
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    x = w["tok_embeddings.weight"][tokens]
    for i in range(hp.n_layers):
        p = f"layers.{i}."
        h = rms_norm(x, w[p + "attention_norm.weight"], hp.eps)
        q = rotate_pairs((h @ w[p + "attention.wq.weight"].T).view(seq_len, hp.n_heads, hd), hp)
        k = rotate_pairs((h @ w[p + "attention.wk.weight"].T).view(seq_len, hp.n_kv_heads, hd), hp)
        v = (h @ w[p + "attention.wv.weight"].T).view(seq_len, hp.n_kv_heads, hd)
        heads = []
        for head in range(hp.n_heads):
            kv = head // per_kv
            scores = (q[:, head] @ k[:, kv].T) / math.sqrt(hd)
            heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, kv])
        x = x + torch.cat(heads, -1) @ w[p + "attention.wo.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"], hp.eps)
        gate, up = h @ w[p + "feed_forward.w1.weight"].T, h @ w[p + "feed_forward.w3.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    output = w["tok_embeddings.weight"] if hp.tied else w["output.weight"]
    return rms_norm(x, w["norm.weight"], hp.eps) @ output.T

"""The model against Llama 3 written out again from its formulas, sharing no code with the package.

`Transformer.forward_full`, the ground truth the engine tests compare both twins with, reuses the
model's own RMSNorm, RoPE and SwiGLU modules, so a mistake in one of those would be in the truth
too. The reference here reads only the state dict, in float64: RMSNorm as x / sqrt(mean(x^2) + eps),
RoPE as a rotation of each interleaved channel pair by cos and sin, attention head by head with each
query head reading KV head h // (n_heads / n_kv_heads), SwiGLU as w2(silu(w1 x) * w3 x).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import CPU, TINY, make_cache, random_requests
from pagedllama.checkpoint import build_model, random_state_dict
from pagedllama.config import ModelArgs
from pagedllama.engine import Engine
from pagedllama.sampling import SamplingParams


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rotate_pairs(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x (S, heads, D): channels (2i, 2i+1) at position p turned by p * theta^(-2i/D)."""
    seq_len, _, dim = x.shape
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs  # (S, D/2)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def reference_logits(sd: dict[str, torch.Tensor], args: ModelArgs, tokens: list[int]) -> torch.Tensor:
    """(S, vocab) float64 logits of one sequence, every position attending to itself and all before."""
    w = {k: v.double() for k, v in sd.items()}
    seq_len, hd = len(tokens), args.head_dim
    per_kv = args.n_heads // args.n_kv_heads
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    x = w["tok_embeddings.weight"][tokens]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        h = rms_norm(x, w[p + "attention_norm.weight"], args.norm_eps)
        q = rotate_pairs((h @ w[p + "attention.wq.weight"].T).view(seq_len, args.n_heads, hd), args.rope_theta)
        k = rotate_pairs((h @ w[p + "attention.wk.weight"].T).view(seq_len, args.n_kv_heads, hd), args.rope_theta)
        v = (h @ w[p + "attention.wv.weight"].T).view(seq_len, args.n_kv_heads, hd)
        heads = []
        for head in range(args.n_heads):
            kv = head // per_kv
            scores = (q[:, head] @ k[:, kv].T) / hd ** 0.5
            heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, kv])
        x = x + torch.cat(heads, -1) @ w[p + "attention.wo.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"], args.norm_eps)
        gate, up = h @ w[p + "feed_forward.w1.weight"].T, h @ w[p + "feed_forward.w3.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    return rms_norm(x, w["norm.weight"], args.norm_eps) @ w["output.weight"].T


def lively_state_dict(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Random weights large enough that every part of a layer moves the logits, and norm weights
    that are not all ones (the demo's are), so scaling by them is checked too."""
    g = torch.Generator().manual_seed(seed)
    sd = random_state_dict(args, seed)
    for name, t in sd.items():
        sd[name] = 1 + 0.5 * torch.randn(t.shape, generator=g) if t.dim() == 1 else t * 8
    if args.tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]  # one tensor again
    return sd


@pytest.mark.parametrize("args", [TINY, replace(TINY, n_kv_heads=1, tie_word_embeddings=True, rope_theta=10000.0)],
                         ids=["gqa-2", "mqa-tied"])
def test_full_forward_equals_the_formulas(args):
    sd = lively_state_dict(args, seed=5)
    model = build_model(args, sd, CPU, torch.float32, max_positions=64)
    tokens = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    got = model.forward_full(tokens).double()
    for b in range(2):
        want = reference_logits(sd, args, tokens[b].tolist())
        assert want.std() > 1  # the logits are far from flat: every weight moved them
        torch.testing.assert_close(got[b], want, atol=1e-4 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("block_size", [16, 128], ids=["paged", "naive"])
def test_engine_logits_equal_the_formulas(block_size):
    """Both twins' cached forward passes (prefill, then decode steps that read K/V through the block
    tables) give the formulas' logits for every token they pick, not only the same argmax."""
    sd = lively_state_dict(TINY, seed=7)
    model = build_model(TINY, sd, CPU, torch.float32, max_positions=128)
    requests = random_requests([(19, 6), (5, 9), (33, 4)], TINY.vocab_size, seed=8)
    engine = Engine(model, make_cache(model, block_size, 40 if block_size == 16 else 3, 128, 3), SamplingParams(),
                    frozenset(), ignore_eos=True)
    rows = []  # (sequence, index of the token being picked, its logits)
    next_tokens = engine._next_tokens

    def record(batch, logits, positions):
        rows.extend(zip(batch, positions.tolist(), logits.double()))
        return next_tokens(batch, logits, positions)

    engine._next_tokens = record
    result = engine.run(requests, progress=False)
    want = {s.request_id: reference_logits(sd, TINY, s.token_ids) for s in result.sequences}
    assert len(rows) == sum(r.max_new_tokens for r in requests)
    for seq, index, logits in rows:  # logits at the token before `index` choose token `index`
        ref = want[seq.request_id][index - 1]
        torch.testing.assert_close(logits, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)

"""Sampling draws tokens with the model's probabilities, within the top-p nucleus."""
from __future__ import annotations

import math

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from pagedllama.engine import sampling
from pagedllama.engine.sampling import SamplingParams, sample

PROBS = [0.5, 0.3, 0.2]
DRAWS = 20_000


def frequencies(params: SamplingParams) -> list[float]:
    """How often each token is drawn from logits log(PROBS), over many sample keys."""
    logits = torch.tensor(PROBS).log().expand(DRAWS, -1)
    tokens = sample(logits, params, torch.arange(DRAWS), torch.full((DRAWS,), 5))
    return (torch.bincount(tokens, minlength=len(PROBS)) / DRAWS).tolist()


@pytest.mark.parametrize("top_p,expected", [
    (1.0, PROBS),
    (0.6, [0.5 / 0.8, 0.3 / 0.8, 0.0]),  # 0.5 alone is short of 0.6: the nucleus takes the token crossing it
    (0.4, [1.0, 0.0, 0.0]),  # the top token alone already covers 0.4
])
def test_tokens_are_drawn_with_their_probabilities_within_the_nucleus(top_p, expected):
    freq = frequencies(SamplingParams(temperature=1.0, top_p=top_p, seed=3))
    tolerance = 4 * math.sqrt(0.25 / DRAWS)  # four standard deviations of a frequency, at worst
    assert freq == pytest.approx(expected, abs=tolerance)


def test_temperature_sharpens_the_distribution():
    """At temperature 0.5 the probabilities go as p^2: 0.25, 0.09, 0.04 over 0.38."""
    freq = frequencies(SamplingParams(temperature=0.5, seed=3))
    assert freq == pytest.approx([0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38], abs=4 * math.sqrt(0.25 / DRAWS))


class IntegerTensorSizes(TorchDispatchMode):
    """Records the number of entries of every integer tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dtype != torch.bool:
                self.sizes.append(t.numel())
        return out


def test_sampling_holds_no_batch_by_vocabulary_integer_tensor(monkeypatch):
    """Random bits and top-p's sort order are made a few rows at a time (here 4 rows of a 64-row
    batch), and the rows' grouping changes no token: each equals that row sampled alone."""
    vocab, batch = 1000, 64
    monkeypatch.setattr(sampling, "SAMPLING_CHUNK_ENTRIES", 4 * vocab)
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))
    keys, positions = torch.arange(batch), torch.arange(batch) + 7
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1)
    with IntegerTensorSizes() as recorded:
        tokens = sample(logits, params, keys, positions)
    assert recorded.sizes and max(recorded.sizes) <= 4 * vocab
    alone = [sample(logits[i:i + 1], params, keys[i:i + 1], positions[i:i + 1]).item() for i in range(batch)]
    assert tokens.tolist() == alone

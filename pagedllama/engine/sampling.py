"""Next-token choice: greedy, or temperature and top-p sampling that is batch-invariant.

Random draws come from a counter-based hash of (seed, sample key, position, token id)
instead of a shared RNG stream, so a request samples the same tokens whatever else is in
the batch, whichever step it was admitted at, and after a preemption is recomputed.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
# Random sampling takes the batch's rows a few at a time, so that its integer temporaries (the
# random bits, top-p's sort order) hold at most this many (row, token) entries, 32 MB of int64:
# a whole batch at once would hold batch x vocabulary, 260 MB at batch 256 and Llama 3's 128,256
# tokens. Rows are independent, so how they are grouped never changes a token.
SAMPLING_CHUNK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_key(request_id: str, index: int = 0) -> int:
    """The random stream of sample `index` of a request: each parallel sample gets its own."""
    return zlib.crc32(request_id.encode()) ^ (index << 32)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform_noise(seed: int, keys: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) uniforms in (0, 1), a pure function of (seed, key, position, token id)."""
    row = _splitmix64(_splitmix64(keys.long() * _MIX1 + seed) + positions.long())
    x = _splitmix64(row[:, None] + torch.arange(vocab, device=keys.device) * _GOLDEN)
    return (_shr(x, 40).float() + 0.5) / float(1 << 24)


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum of each row of a float32 (B, V) tensor.

    On CPU through numpy, whose argmax is vectorized: PyTorch's CPU row reductions with indices
    (`argmax`, `max(-1)`) run about 9x slower on a (256, 4352) batch of logits, a twentieth of
    the demo's whole decode step. Both return the first maximum.
    """
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy().argmax(-1))
    return x.argmax(-1)


def sample(logits: torch.Tensor, params: SamplingParams, keys: torch.Tensor | None,
           positions: torch.Tensor) -> torch.Tensor:
    """Token ids (B,) from float32 logits (B, vocab).

    `keys` tells samples apart (request and sample index; greedy needs none); `positions` is
    where the new token goes. Sampling is an exponential race: argmax(p / E) with E ~ Exp(1) picks
    token i with probability p_i, and needs no normalisation or cumulative search.
    """
    if params.greedy:
        return first_argmax(logits)
    rows = max(1, SAMPLING_CHUNK_ENTRIES // logits.shape[-1])
    return torch.cat([_sample_rows(logits[i:i + rows], params, keys[i:i + rows], positions[i:i + rows])
                      for i in range(0, len(logits), rows)])


def _sample_rows(logits: torch.Tensor, params: SamplingParams, keys: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    scaled = logits / params.temperature
    if params.top_p < 1.0:
        sorted_logits, order = scaled.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        beyond = probs.cumsum(-1) - probs > params.top_p  # the first token is always kept
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(beyond, float("-inf")))
    exp_noise = -uniform_noise(params.seed, keys, positions, logits.shape[-1]).log()
    return first_argmax(scaled - exp_noise.log())

"""How many contiguous KV slots the naive twin reserves for a request: the vLLM paper's Orca baselines.

Kwon et al., "Efficient Memory Management for Large Language Model Serving with PagedAttention"
(SOSP 2023, arXiv 2309.06180), section 6.1, "Baseline 2: Orca", implements three versions of Orca
"based on how much it over-reserves the space for request outputs":

- Orca (Max): "always reserves the space up to the maximum sequence length of the model";
- Orca (Pow2): "over-reserves the space for outputs by at most 2x. For example, if the true output
  length is 25, it reserves 32 positions for outputs." The rounding is on the output length; the
  prompt is added on top (rounding prompt + output instead would reserve 128, not 72, for a 40-token
  prompt and that 25-token answer);
- Orca (Oracle): "the system has the knowledge of the lengths of the outputs that will be actually
  generated": it reserves the slots the request will write, prompt + output - 1: the last sampled
  token is never fed back, so its K/V is never written, and Oracle shows no internal
  fragmentation, as in the paper's Figure 2.

Every reservation is capped at `max_seq_len`, the most a request may ever hold. (The naive twin
then rounds it up to whole 16-slot blocks: see `budget.cache_layout`.)
"""
from __future__ import annotations

from typing import Literal, get_args

from ..errors import UsageError, UserError

ReservePolicy = Literal["max", "pow2", "oracle"]
RESERVE_POLICIES: tuple[str, ...] = get_args(ReservePolicy)


def next_power_of_two(n: int) -> int:
    """The smallest power of two at or above `n` (0 for 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def reservation_slots(policy: str, prompt_len: int, output_len: int | None, max_seq_len: int) -> int:
    """KV slots reserved, in one contiguous range, when a request is admitted under `policy`.

    `output_len` is the request's true answer length in tokens (known ahead only to an oracle: from
    the dataset's reference answers, or from a first run's --json); `max` does not need it.
    """
    if policy not in RESERVE_POLICIES:
        raise UsageError(f"unknown reservation policy {policy!r}; use one of: {', '.join(RESERVE_POLICIES)}")
    if policy == "max":
        return max_seq_len
    if output_len is None:
        raise UserError(f"--reserve {policy} needs each request's true answer length, and this model stops by "
                        "itself; run once with --json FILE and give --oracle-lengths FILE, or add --ignore-eos, "
                        "or use --reserve max")
    if policy == "oracle":
        return min(prompt_len + max(output_len - 1, 0), max_seq_len)
    return min(prompt_len + next_power_of_two(output_len), max_seq_len)

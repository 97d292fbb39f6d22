"""The naive twin's reservation policies: the vLLM paper's Orca (Max), (Pow2) and (Oracle)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedllama.errors import UsageError, UserError
from pagedllama.engine.reservation import RESERVE_POLICIES, next_power_of_two, reservation_slots


def test_policy_names():
    assert RESERVE_POLICIES == ("max", "pow2", "oracle")


@pytest.mark.parametrize("n, expected", [(0, 0), (1, 1), (2, 2), (3, 4), (25, 32), (32, 32), (33, 64), (1000, 1024)])
def test_next_power_of_two(n, expected):
    assert next_power_of_two(n) == expected


@pytest.mark.parametrize("policy, prompt, output, expected", [
    ("max", 40, 25, 2048),
    ("max", 40, None, 2048),  # max needs no answer length
    ("oracle", 40, 25, 64),  # the 25th answer token is sampled, never fed back: its K/V is never written
    ("oracle", 40, 1, 40),
    ("pow2", 40, 25, 72),  # the paper's example: 25 output tokens reserve 32 positions; the prompt on top
    ("pow2", 40, 32, 72),  # already a power of two: no over-reservation
    ("pow2", 40, 33, 104),  # just past one: almost 2x
    ("pow2", 2020, 25, 2048),  # 2052, capped at max_seq_len
    ("oracle", 2040, 25, 2048),
    ("pow2", 7, 0, 7),
])
def test_reservation_values(policy, prompt, output, expected):
    assert reservation_slots(policy, prompt, output, max_seq_len=2048) == expected


@given(prompt=st.integers(1, 3000), output=st.integers(1, 3000), max_seq_len=st.integers(1, 8192))
def test_policies_order_and_bounds(prompt, output, max_seq_len):
    oracle, pow2, most = (reservation_slots(p, prompt, output, max_seq_len) for p in ("oracle", "pow2", "max"))
    assert oracle <= pow2 <= most == max_seq_len
    assert oracle == min(prompt + output - 1, max_seq_len)  # the slots the request writes
    assert pow2 - prompt < 2 * output or pow2 == max_seq_len  # over-reserves the output by less than 2x


def test_unknown_policy_is_a_usage_error():
    with pytest.raises(UsageError) as err:
        reservation_slots("buddy", 10, 5, 2048)
    message = str(err.value)
    assert "'buddy'" in message and "max, pow2, oracle" in message and "\n" not in message
    assert err.value.exit_code == 2


@pytest.mark.parametrize("policy", ["oracle", "pow2"])
def test_answer_length_needed(policy):
    with pytest.raises(UserError) as err:
        reservation_slots(policy, 10, None, 2048)
    message = str(err.value)
    assert f"--reserve {policy}" in message and "answer length" in message and "\n" not in message
    assert err.value.exit_code == 1

"""The four-way KV breakdown: hand-computed traces for each part, and the parts summing to the
budget at every step of random traces (checked against a per-unit Python model)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllama.app.waste import format_waste_table, plot_breakdown
from pagedllama.engine.waste import PARTS, WasteRecorder
from pagedllama.engine.contiguous_allocator import ContiguousAllocator
from pagedllama.errors import UserError


def naive_trace() -> WasteRecorder:
    """Three contiguous reservations in 10 slots; two end and leave holes of 4 and 3 that a waiting
    5-slot request cannot use; then the last one ends and that request fits.

    unit  size  written per step    W_final  internal
    A     4     2, 3                3        1
    B     3     1, 2, 3             3        0
    C     3     2, 2                2        1
    D     5     -, -, -, 2          4        1  (it writes 4 later, after the recorded steps)
    """
    alloc, rec = ContiguousAllocator(10), WasteRecorder(10, 2, 10)

    def reserve(n: int) -> int:
        offset = alloc.allocate(n)
        rec.allocate(offset, n)
        return offset

    def release(offset: int) -> None:
        alloc.free(offset)
        rec.free(offset)

    a, b, c = reserve(4), reserve(3), reserve(3)
    rec.step([a, b, c], [2, 1, 2], alloc.free_slots)
    rec.step([a, b, c], [3, 2, 2], alloc.free_slots)
    release(a)
    release(c)
    assert alloc.allocate(5) is None  # D waits: 7 slots free, in holes of 4 and 3
    rec.step([b], [3], alloc.free_slots, alloc.external_fragmentation([5]))
    release(b)
    d = reserve(5)
    rec.step([d], [2], alloc.free_slots, alloc.external_fragmentation([]))
    rec.step([d], [4], alloc.free_slots)
    return rec


# Per step: token states, reservation, internal fragmentation, external fragmentation, free.
NAIVE_PARTS = [[5, 3, 2, 0, 0],  # A 2 of 3 written (1 reserved, 1 never), B 1 of 3, C 2 of 2 (1 never)
               [7, 1, 2, 0, 0],
               [3, 0, 0, 7, 0],  # B alone; all 7 free slots are in holes too small for D
               [2, 2, 1, 0, 5],
               [4, 0, 1, 0, 5]]


def test_hand_computed_naive_trace():
    breakdown = naive_trace().breakdown()
    assert breakdown.parts.tolist() == NAIVE_PARTS
    assert breakdown.peak_step == 0  # 10 slots not free at steps 0 to 2: the first
    assert breakdown.slots("peak").tolist() == NAIVE_PARTS[0]
    assert breakdown.slots("average").tolist() == pytest.approx(np.mean(NAIVE_PARTS, axis=0).tolist())
    assert breakdown.slots("average").tolist() == pytest.approx([4.2, 1.2, 1.2, 1.4, 2.0])


def test_preempted_reservation_is_internal_fragmentation():
    """A request preempted after writing 3 of its 8 slots frees them; its recomputation is a new
    unit under the same key that goes on to write 6."""
    rec = WasteRecorder(8, 1, 1)
    rec.allocate(0, 8)
    rec.step([0], [2], 0)
    rec.step([0], [3], 0)
    rec.free(0)  # preempted (recompute)
    rec.step([], [], 8)
    rec.allocate(0, 8)
    rec.step([0], [4], 0)
    rec.step([0], [6], 0)
    assert rec.breakdown().parts.tolist() == [[2, 1, 5, 0, 0], [3, 0, 5, 0, 0], [0, 0, 0, 0, 8],
                                              [4, 2, 2, 0, 0], [6, 0, 2, 0, 0]]


def test_paged_blocks():
    """Paged twin, blocks of 4 in a pool of 3: a request grows from 6 to 7 tokens and stops there; its
    last block's one unwritten slot is internal fragmentation, the full block has none."""
    rec = WasteRecorder(12, 4, 3)
    rec.allocate(2, 4)
    rec.allocate(0, 4)
    rec.step(np.array([2, 0]), np.array([4, 2]), 4)
    rec.step(np.array([2, 0]), np.array([4, 3]), 4)
    breakdown = rec.breakdown()
    assert breakdown.parts.tolist() == [[6, 1, 1, 0, 4], [7, 0, 1, 0, 4]]
    assert breakdown.peak_step == 0


def test_peak_is_the_step_with_most_memory_not_free():
    rec = WasteRecorder(10, 1, 2)
    rec.allocate(0, 2)
    rec.step([0], [1], 8)
    rec.allocate(1, 6)
    rec.step([0, 1], [2, 1], 2)
    rec.free(0)
    rec.step([1], [2], 4, 4)  # 4 not free either: external fragmentation counts as used up
    breakdown = rec.breakdown()
    assert breakdown.peak_step == 2
    assert breakdown.slots("peak").tolist() == [2, 0, 4, 4, 0]


def test_json_and_table():
    breakdown = naive_trace().breakdown()
    doc = json.loads(json.dumps(breakdown.to_json()))
    assert doc["budget_bytes"] == 20 and doc["bytes_per_slot"] == 2 and doc["steps"] == 5 and doc["peak_step"] == 0
    assert doc["peak"]["token_states"] == {"bytes": 10.0, "share": 0.5}
    assert doc["average"]["external_fragmentation"] == {"bytes": pytest.approx(2.8), "share": pytest.approx(0.14)}
    for at in ("peak", "average"):
        assert sum(doc[at][p]["share"] for p in PARTS) == pytest.approx(1.0)
    assert doc["timeline"]["external_fragmentation_bytes"] == [0, 0, 14, 0, 0]
    table = format_waste_table({"Orca (Pow2)": breakdown, "paged": breakdown}, at="peak")
    assert "Orca (Pow2)" in table and "paged" in table
    row = next(line for line in table.splitlines() if line.strip().startswith("token states"))
    assert row.split() == ["token", "states", "10", "B", "50.0%", "10", "B", "50.0%"]
    row = next(line for line in format_waste_table({"x": breakdown}, at="average").splitlines() if "external" in line)
    assert row.split()[-1] == "14.0%"


def test_no_steps():
    breakdown = WasteRecorder(6, 2, 1).breakdown()
    assert breakdown.peak_step is None
    assert breakdown.slots("average").tolist() == [0, 0, 0, 0, 6]
    with pytest.raises(ValueError, match="'peak' or 'average'"):
        breakdown.slots("median")


@pytest.mark.parametrize("bad_step, message", [
    (lambda r: r.step([0], [1], 5), "is not the budget"),  # free slots disagree with the live reservations
    (lambda r: r.step([], [], 6), "0 units given, 1 live"),
    (lambda r: r.step([1], [1], 6), "not live"),
    (lambda r: r.step([0], [1], 6, 7), "fragmented"),
])
def test_inconsistent_steps_are_refused(bad_step, message):
    rec = WasteRecorder(10, 1, 2)
    rec.allocate(0, 4)
    with pytest.raises(AssertionError, match=message):
        bad_step(rec)


def test_writing_past_a_reservation_is_refused():
    rec = WasteRecorder(10, 1, 1)
    rec.allocate(0, 4)
    rec.step([0], [5], 6)
    with pytest.raises(AssertionError, match="outside its size"):
        rec.breakdown()


def test_plot(tmp_path):
    breakdown = naive_trace().breakdown()
    path = plot_breakdown({"Orca (Max)": breakdown, "paged": breakdown}, tmp_path / "waste.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    with pytest.raises(UserError, match="needs matplotlib: pip install") as err:
        plot_breakdown({"paged": naive_trace().breakdown()}, tmp_path / "waste.png")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "waste.png").exists()


# A random trace: each op opens a unit (size), closes one (pick), or records a step in which every
# live unit writes some more of its size (growth).
trace_ops = st.lists(st.tuples(st.sampled_from(["open", "close", "step", "step"]), st.integers(1, 12),
                               st.integers(0, 100), st.integers(0, 3)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(12, 60), ops=trace_ops)
def test_parts_sum_to_budget_and_match_a_per_unit_model(budget, ops):
    num_keys = 8
    rec = WasteRecorder(budget, 3, num_keys)
    live: dict[int, list] = {}  # key -> [size, written, the unit's history of (step, written)]
    units: list[list] = []
    steps = 0
    for op, size, pick, grow in ops:
        free = budget - sum(u[0] for u in live.values())
        free_keys = [k for k in range(num_keys) if k not in live]
        if op == "open" and free_keys and size <= free:
            unit = [size, 0, []]
            live[free_keys[pick % len(free_keys)]] = unit
            units.append(unit)
            rec.allocate(free_keys[pick % len(free_keys)], size)
        elif op == "close" and live:
            key = sorted(live)[pick % len(live)]
            del live[key]
            rec.free(key)
        elif op == "step":
            keys = sorted(live)
            for k in keys:
                live[k][1] = min(live[k][0], live[k][1] + grow)
                live[k][2].append((steps, live[k][1]))
            external = pick % (free + 1)
            rec.step(np.array(keys, dtype=np.int64), np.array([live[k][1] for k in keys]), free, external)
            steps += 1
            expected_external_free = (external, free - external)
    breakdown = rec.breakdown()
    assert breakdown.parts.shape == (steps, len(PARTS))
    assert (breakdown.parts >= 0).all()
    assert (breakdown.parts.sum(axis=1) == budget).all()
    expected = np.zeros((steps, 3), dtype=np.int64)  # token states, reservation, internal, from the model
    for size, _, history in units:
        final = max((w for _, w in history), default=0)
        for step, written in history:
            expected[step] += [written, final - written, size - final]
    assert (breakdown.parts[:, :3] == expected).all()
    if steps:
        assert tuple(breakdown.parts[-1, 3:]) == expected_external_free
        not_free = budget - breakdown.parts[:, 4]
        assert not_free[breakdown.peak_step] == not_free.max()
        assert breakdown.shares("average").sum() == pytest.approx(1.0)

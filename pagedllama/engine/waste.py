"""Where the KV memory went: the vLLM paper's four-way breakdown, decided after the run.

Kwon et al. (SOSP 2023, arXiv 2309.06180), section 3.1 and Figure 2, split a serving system's KV
memory into token states and three wastes:
- token states: slots holding a token's K/V;
- reservation: reserved slots the request will still write ("eventually used", but held for the
  request's whole life, so no other request can use them);
- internal fragmentation: reserved slots the request never writes ("only realized after a request
  has finished sampling");
- external fragmentation: free memory cut into holes too small for the next request (contiguous
  reservations only; a paged pool's every free block fits).
Here free memory is a fifth part, so the five sum to the KV budget at every step. The paper's bars
(a saturated server) fold it into "External Frag. & Others".

The engine records a trace of allocation units: one contiguous reservation (naive twin) or one
physical block (paged twin), from allocate to free. At every step it hands over, per live unit, the
slots written so far, the free slots, and the free slots lost to external fragmentation (see
`ContiguousAllocator.external_fragmentation`). After the run each unit's W_final (the most slots it
ever held) splits its size: at step t, written(t) are token states, W_final - written(t)
reservation, size - W_final internal fragmentation (a preempted request's freed reservation
included: its recomputation gets a new unit). The text table and the plot are in app/waste.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PARTS = ("token_states", "reservation", "internal_fragmentation", "external_fragmentation", "free")


class WasteRecorder:
    """The allocation-unit trace of one run, for `breakdown`.

    Units are named by the engine's own `key` (a block id, or a reservation's offset) in
    [0, num_keys); a key is reused by each new lifetime. `step` is called once per step with numpy
    arrays and does no per-unit Python; it keeps two int32 per live unit per step.
    """

    def __init__(self, budget_slots: int, bytes_per_slot: int, num_keys: int):
        self.budget_slots = budget_slots
        self.bytes_per_slot = bytes_per_slot
        self._unit_of = np.full(num_keys, -1, dtype=np.int32)  # key -> its live unit, -1 when none
        self._sizes: list[int] = []  # per unit, in slots
        self._num_live = 0
        self._live_slots = 0
        self._units: list[np.ndarray] = []  # per step: its live units ...
        self._written: list[np.ndarray] = []  # ... and the slots each has written
        self._free: list[int] = []
        self._external: list[int] = []

    def allocate(self, key: int, size: int) -> None:
        """A new allocation lifetime of `size` slots starts under `key`."""
        assert self._unit_of[key] < 0, f"key {key} is already live"
        self._unit_of[key] = len(self._sizes)
        self._sizes.append(size)
        self._num_live += 1
        self._live_slots += size

    def free(self, key: int) -> None:
        """The lifetime under `key` ends."""
        unit = self._unit_of[key]
        assert unit >= 0, f"key {key} is not live"
        self._unit_of[key] = -1
        self._num_live -= 1
        self._live_slots -= self._sizes[unit]

    def step(self, keys: np.ndarray, written: np.ndarray, free_slots: int, external_slots: int = 0) -> None:
        """One step: every live unit's key and slots written so far, the free slots, and how many
        of those are lost to external fragmentation."""
        step = len(self._free)
        assert len(keys) == self._num_live, f"step {step}: {len(keys)} units given, {self._num_live} live"
        assert self._live_slots + free_slots == self.budget_slots, \
            f"step {step}: {self._live_slots} reserved + {free_slots} free is not the budget {self.budget_slots}"
        assert 0 <= external_slots <= free_slots, f"step {step}: {external_slots} fragmented of {free_slots} free"
        units = self._unit_of[np.asarray(keys, dtype=np.int64)]
        assert (units >= 0).all(), f"step {step}: a key given is not live"
        self._units.append(units)
        self._written.append(np.array(written, dtype=np.int32))
        self._free.append(free_slots)
        self._external.append(external_slots)

    def breakdown(self) -> WasteBreakdown:
        """The five parts at every step, now that each unit's final length is known."""
        steps = len(self._free)
        sizes = np.array(self._sizes, dtype=np.int64)
        units = np.concatenate(self._units) if steps else np.zeros(0, np.int32)
        written = np.concatenate(self._written).astype(np.int64) if steps else np.zeros(0, np.int64)
        assert (written >= 0).all() and (written <= sizes[units]).all(), "a unit wrote outside its size"
        final = np.zeros(len(sizes), dtype=np.int64)
        np.maximum.at(final, units, written)
        step_of = np.repeat(np.arange(steps), [len(u) for u in self._units])

        def per_step(values: np.ndarray) -> np.ndarray:
            return np.bincount(step_of, weights=values, minlength=steps).round().astype(np.int64)

        external = np.array(self._external, dtype=np.int64)
        parts = np.stack([per_step(written), per_step(final[units] - written), per_step(sizes[units] - final[units]),
                          external, np.array(self._free, dtype=np.int64) - external], axis=1)
        assert (parts.sum(axis=1) == self.budget_slots).all(), "the parts do not sum to the budget"
        return WasteBreakdown(parts, self.budget_slots, self.bytes_per_slot)


@dataclass(frozen=True)
class WasteBreakdown:
    """`parts[t]`: the slots of each of PARTS at step t; each row sums to `budget_slots`."""

    parts: np.ndarray
    budget_slots: int
    bytes_per_slot: int

    @property
    def peak_step(self) -> int | None:
        """The step with most memory not free (the first, on a tie); None for a run of no steps.
        External fragmentation counts as not free: it is memory no waiting request can use."""
        if not len(self.parts):
            return None
        return int(np.argmax(self.budget_slots - self.parts[:, PARTS.index("free")]))

    @property
    def hole_waits(self) -> int:
        """Steps at which the queue's head fit in the free memory but in no hole (external fragmentation)."""
        return int((self.parts[:, PARTS.index("external_fragmentation")] > 0).sum()) if len(self.parts) else 0

    def slots(self, at: str) -> np.ndarray:
        """Slots of each part at the peak step (`at="peak"`) or averaged over steps ("average")."""
        if at not in ("peak", "average"):
            raise ValueError(f"at must be 'peak' or 'average', not {at!r}")
        if not len(self.parts):  # nothing ran: all free
            return np.array([0, 0, 0, 0, self.budget_slots], dtype=np.float64)
        return self.parts[self.peak_step].astype(np.float64) if at == "peak" else self.parts.mean(axis=0)

    def shares(self, at: str) -> np.ndarray:
        return self.slots(at) / self.budget_slots

    def to_json(self) -> dict:
        """Bytes and shares of the budget at the peak and on average, and the per-step bytes."""
        def parts(at: str) -> dict:
            return {p: {"bytes": float(s * self.bytes_per_slot), "share": float(s / self.budget_slots)}
                    for p, s in zip(PARTS, self.slots(at))}
        return {"budget_bytes": self.budget_slots * self.bytes_per_slot, "bytes_per_slot": self.bytes_per_slot,
                "steps": len(self.parts), "peak_step": self.peak_step, "hole_waits": self.hole_waits, "peak": parts("peak"),
                "average": parts("average"),
                "timeline": {f"{p}_bytes": (self.parts[:, i] * self.bytes_per_slot).tolist()
                             for i, p in enumerate(PARTS)}}

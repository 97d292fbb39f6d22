"""What sharing KV blocks saves: the same run with every block table holding its own copies.

Samples and beams of a request, and (with prefix caching) requests with a common prefix,
hold shared blocks once. Counting each table's blocks separately gives what independent
copies would reserve on the same schedule; the report sets its peak against the real one.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..units import human_bytes
from .sequence import Request


def one_per_sequence(requests: list[Request]) -> list[Request]:
    """Each request once per sequence it runs (n samples or W beams): what a cache needs rows for,
    and what the naive twin preallocates, a full max_seq_len row per sample or beam."""
    return [r for r in requests for _ in range(r.width)]


@dataclass
class SharingTracker:
    """The peak, over steps, of the blocks all block tables point at, shared ones counted per table."""

    peak_table_blocks: int = 0

    def record(self, table_blocks: int) -> None:
        """`table_blocks`: the entries of the running sequences' block tables, the allocator's `num_refs`."""
        self.peak_table_blocks = max(self.peak_table_blocks, table_blocks)

    def summary(self, memory: dict, n: int, beam_width: int, prefix_caching: bool = False) -> dict:
        """Figures for the report and --json, next to the memory summary of the same run."""
        unshared = self.peak_table_blocks * memory["block_size"] * memory["bytes_per_token"]
        saved = unshared - memory["peak_reserved_bytes"]
        return {"n": n, "beam_width": beam_width, "prefix_caching": prefix_caching,
                "peak_reserved_bytes": memory["peak_reserved_bytes"], "unshared_peak_bytes": unshared, "saved_bytes": saved,
                "saved_fraction": saved / unshared if unshared else 0.0}


def format_sharing(s: dict) -> str:
    what = f"n {s['n']}, beam width {s['beam_width']}" + (", prefix caching" if s["prefix_caching"] else "")
    return (f"  sharing ({what}): peak reserved {human_bytes(s['peak_reserved_bytes'])} vs "
            f"{human_bytes(s['unshared_peak_bytes'])} with a copy per sequence; saved {human_bytes(s['saved_bytes'])} ({100 * s['saved_fraction']:.1f}%)")

"""The KV memory report both twins print, and its --json columns (engine/memory.py has the words).

GB means 2**30 bytes throughout, as nvidia-smi and PyTorch count. Shares in --json are
fractions (0.5 is half), printed as percents.
"""
from __future__ import annotations

from ..engine.memory import MemorySample
from ..units import GB, human_bytes


def timeline_json(timeline: list[MemorySample], bytes_per_slot: int) -> dict:
    """The per-step memory timeline as columns (one entry per step), for --json users to plot."""
    return {"reserved_bytes": [s.reserved_tokens * bytes_per_slot for s in timeline],
            "used_bytes": [s.used_tokens * bytes_per_slot for s in timeline],
            "running": [s.running for s in timeline], "waiting": [s.waiting for s in timeline]}


def format_memory_report(m: dict, title: str, interrupted: bool = False, ranks: int = 1) -> str:
    """A readable table, ending with the classic `Fragmented Memory:` line (with the size in MB too
    when it is under 0.01 GB, which that line would print as 0.00 GB). Figures count all `ranks`
    together; with tensor parallelism a row gives one rank's share (1/N of every block's KV heads)."""
    budget = m["budget_bytes"]

    def pct(n: float) -> str:
        return f"{100 * n / budget:6.2f}% of budget" if budget else ""

    rows = [
        ("KV budget", human_bytes(budget), ""),
        ("pool", human_bytes(m["pool_bytes"]),
         f"{m['num_blocks']} blocks x {m['block_size']} slots x {human_bytes(m['bytes_per_token'])}/slot"),
        *([("pool per rank", human_bytes(m["pool_bytes"] // ranks),
            f"{ranks} ranks, each 1/{ranks} of every block's KV heads; reserved at peak "
            f"{human_bytes(m['peak_reserved_bytes'] // ranks)} each")] if ranks > 1 else []),
        ("blocks in use at peak", f"{m['peak_blocks_in_use']}", f"of {m['num_blocks']}"),
        ("reserved at peak", human_bytes(m["peak_reserved_bytes"]), pct(m["peak_reserved_bytes"])),
        ("holding tokens at peak", human_bytes(m["peak_used_bytes"]), pct(m["peak_used_bytes"])),
        ("fragmented at peak", human_bytes(m["peak_fragmented_bytes"]), pct(m["peak_fragmented_bytes"])),
        ("KV utilization at peak", f"{100 * m['peak_utilization']:.1f}%", "holding / reserved"),
        ("reserved at last step", human_bytes(m["end_reserved_bytes"]), pct(m["end_reserved_bytes"])),
        ("holding tokens at last step", human_bytes(m["end_used_bytes"]), pct(m["end_used_bytes"])),
        ("fragmented at last step", human_bytes(m["end_fragmented_bytes"]), pct(m["end_fragmented_bytes"])),
        ("blocks in use after", f"{m['blocks_in_use_after']}",
         f"of {m['num_blocks']}: " + ("held by the requests interrupted mid-run" if interrupted
                                      else "finished requests free theirs")),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [title, "-" * len(title)]
    lines += [f"  {name:<{width}}  {value:>10}  {note}".rstrip() for name, value, note in rows]
    fragmented = m["peak_fragmented_bytes"]
    small = f" = {fragmented / (1 << 20):.2f} MB" if 0 < fragmented < GB / 100 else ""
    lines.append(f"Fragmented Memory: {fragmented / GB:.2f} GB ({100 * m['fragmented_fraction_of_budget']:.2f}%)"
                 f"{small}  [at peak, % of the KV budget]")
    return "\n".join(lines)

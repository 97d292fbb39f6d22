"""The four-way KV breakdown for people: a text table of systems side by side, and the paper-style
stacked bars (the trace and the breakdown itself are engine/waste.py's)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine.config import EngineConfig
from ..engine.waste import PARTS, WasteBreakdown
from ..errors import UserError
from ..units import human_bytes

LABELS = dict(zip(PARTS, ("token states", "reservation", "internal frag.", "external frag.", "free")))
# The paper's Figure 2 (see ../shared/REFERENCE.md, section 6): share of KV memory holding token states.
PAPER_TOKEN_STATES_EARLIER = (0.204, 0.382)  # Orca (Max) .. Orca (Oracle)
PAPER_TOKEN_STATES_VLLM = 0.963


# The vLLM paper's names (section 6.1) for the naive twin's reservation policies.
PAPER_NAMES = {"max": "Orca (Max)", "pow2": "Orca (Pow2)", "oracle": "Orca (Oracle)"}


def system_name(config: EngineConfig) -> str:
    """How reports and --json name a twin and its reservation policy: naive, naive-pow2, naive-oracle, paged."""
    return config.twin if config.twin == "paged" or config.reserve == "max" else f"naive-{config.reserve}"


def system_label(config: EngineConfig) -> str:
    """The name tables and plots show: the paper's (Orca (Max), (Pow2), (Oracle); vLLM for the paged twin)."""
    return PAPER_NAMES[config.reserve] if config.twin == "naive" else "paged (vLLM)"


def waste_json(config: EngineConfig, breakdown: WasteBreakdown) -> dict:
    """--json's "waste": which system, and its breakdown (`WasteBreakdown.to_json`)."""
    return {"system": system_name(config), "reserve": config.reserve if config.twin == "naive" else None,
            **breakdown.to_json()}


def format_waste_report(config: EngineConfig, breakdown: WasteBreakdown) -> str:
    """The four parts at the peak and on average, and how often the queue waited for a hole."""
    label = system_label(config)
    lines = [format_waste_table({label: breakdown}, "peak"), format_waste_table({label: breakdown}, "average")]
    if config.twin == "naive" and config.reserve != "max":
        lines.append(f"  external fragmentation: the next request fit in the free memory but in no hole at "
                     f"{breakdown.hole_waits} of {len(breakdown.parts)} steps")
    return "\n".join(lines)


def format_waste_table(systems: dict[str, WasteBreakdown], at: str = "peak") -> str:
    """Systems side by side, one row per part, each in bytes and % of its KV budget."""
    title = "KV memory at the peak step (most memory not free)" if at == "peak" else "KV memory, averaged over steps"
    names = list(systems)
    width = max(17, *(len(n) for n in names))

    def cell(slots: float, b: WasteBreakdown) -> str:
        return f"{human_bytes(slots * b.bytes_per_slot):>10} {100 * slots / b.budget_slots:5.1f}%"
    cells = {n: [cell(s, b) for s in [*b.slots(at), b.budget_slots]] for n, b in systems.items()}
    lines = [title, "-" * len(title), " " * 16 + "".join(f"  {n:>{width}}" for n in names)]
    lines += [f"  {label:<14}" + "".join(f"  {cells[n][i]:>{width}}" for n in names)
              for i, label in enumerate([*LABELS.values(), "KV budget"])]
    return "\n".join(lines)


def plot_breakdown(systems: dict[str, WasteBreakdown], path: Path, at: str = "average",
                   reference: bool = True) -> Path:
    """A stacked bar per system of its parts as shares of its KV budget, as the paper's Figure 2
    draws them (which averages over its run: hence `at="average"`); `reference` shades the paper's
    published token-state shares."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting the KV breakdown needs matplotlib: pip install -r requirements.txt") from None
    colors = ("#2e7d32", "#f9a825", "#c62828", "#6a1b9a", "#e0e0e0")
    fig = Figure(figsize=(1.6 * len(systems) + 3.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(systems))
    shares = np.array([b.shares(at) for b in systems.values()]).reshape(len(systems), len(PARTS)) * 100
    bottom = np.zeros(len(systems))
    for i, part in enumerate(PARTS):
        ax.bar(x, shares[:, i], 0.6, bottom=bottom, color=colors[i], label=LABELS[part], edgecolor="white")
        for xi, (b, s) in enumerate(zip(bottom, shares[:, i])):
            if s >= 4:
                ax.text(xi, b + s / 2, f"{s:.1f}%", ha="center", va="center", fontsize=8)
        bottom += shares[:, i]
    if reference:
        low, high = PAPER_TOKEN_STATES_EARLIER
        ax.axhspan(100 * low, 100 * high, color="#2e7d32", alpha=0.15, zorder=0,
                   label=f"paper: earlier systems' token states {100 * low:.1f}-{100 * high:.1f}%")
        ax.axhline(100 * PAPER_TOKEN_STATES_VLLM, color="#2e7d32", ls="--", lw=1,
                   label=f"paper: vLLM's token states {100 * PAPER_TOKEN_STATES_VLLM:.1f}%")
    ax.set_xticks(x, list(systems))
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of the KV budget")
    ax.set_title("KV memory at the peak step" if at == "peak" else "KV memory, averaged over steps")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)

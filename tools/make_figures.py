"""Draw assets/paged_cache.png: block tables mapping each request's logical blocks to physical ones.

The picture is taken from a real BlockManager: three requests grow a token at a
time, so their blocks interleave in the pool; one finishes and a new request reuses its blocks.
Run: python tools/make_figures.py
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

from pagedllama.engine.block_manager import BlockManager  # noqa: E402
from pagedllama.engine.config import CacheLayout  # noqa: E402
from pagedllama.engine.sequence import Sequence  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "assets" / "paged_cache.png"
BLOCK, POOL = 4, 10
COLORS = {"A": "#4C72B0", "B": "#C44E52", "C": "#55A868", "D": "#8172B2"}


def build_state() -> tuple[BlockManager, list[Sequence]]:
    cache = BlockManager(CacheLayout(BLOCK, POOL), 64, 4)
    seqs = {name: Sequence(i, name, [0] * n, n, 99) for i, (name, n) in enumerate([("A", 6), ("B", 3), ("C", 5)])}
    for seq in seqs.values():
        cache.allocate(seq)
        cache.commit([seq], is_prefill=True)
    for _ in range(5):  # decode steps: each request grows by one token, taking a block when it needs one
        for seq in seqs.values():
            seq.token_ids.append(0)
            cache.grow(seq, seq.num_tokens)
        cache.commit(list(seqs.values()), is_prefill=False)
    cache.free(seqs.pop("B"))  # B finishes: its blocks go back to the pool at once...
    d = Sequence(3, "D", [0] * 13, 13, 99)  # ...and the next request takes them
    cache.allocate(d)
    cache.commit([d], is_prefill=True)
    seqs["D"] = d
    return cache, list(seqs.values())


def draw(cache: BlockManager, seqs: list[Sequence], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(11, 5.2))
    owner = {b: s for s in seqs for b in s.block_table}
    pool_y, w = 0.0, 0.9
    for b in range(POOL):
        seq = owner.get(b)
        ax.add_patch(Rectangle((b, pool_y), w, w, fill=False, lw=1.2))
        if seq:
            i = seq.block_table.index(b)
            used = min(BLOCK, seq.num_cached_tokens - i * BLOCK)
            ax.add_patch(Rectangle((b, pool_y), w * used / BLOCK, w, color=COLORS[seq.request_id], alpha=0.85))
            ax.text(b + w / 2, pool_y - 0.25, f"{seq.request_id}{i}", ha="center", fontsize=8)
        ax.text(b + w / 2, pool_y + w + 0.1, str(b), ha="center", fontsize=8, color="gray")
    ax.text(-0.3, pool_y + w / 2, "physical\nblocks", ha="right", va="center", fontsize=9)
    for row, seq in enumerate(seqs):
        y = 2.3 + 1.25 * (len(seqs) - 1 - row)
        x0 = 0.6 + 2.2 * row
        ax.text(x0 - 0.2, y + w / 2, f"{seq.request_id}: {seq.num_cached_tokens} tokens\nblock table "
                f"{seq.block_table}", ha="right", va="center", fontsize=8)
        for i, b in enumerate(seq.block_table):
            x = x0 + i
            used = min(BLOCK, seq.num_cached_tokens - i * BLOCK)
            ax.add_patch(Rectangle((x, y), w, w, fill=False, lw=1.2))
            ax.add_patch(Rectangle((x, y), w * used / BLOCK, w, color=COLORS[seq.request_id], alpha=0.85))
            ax.add_patch(FancyArrowPatch((x + w / 2, y), (b + w / 2, pool_y + w + 0.35), arrowstyle="-|>",
                                         mutation_scale=8, color=COLORS[seq.request_id], lw=0.8, alpha=0.7))
    ax.set_xlim(-4.5, POOL + 0.5)
    ax.set_ylim(-0.7, 2.3 + 1.25 * len(seqs))
    ax.axis("off")
    ax.set_title(f"Paged KV cache, block size {BLOCK}: each request's block table maps its logical blocks to "
                 "physical ones.\nColour = slots holding tokens; only a request's last block is partly empty. "
                 "B finished; D got its blocks 2 and 5.", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    draw(*build_state(), OUT)
    print(f"wrote {OUT}")

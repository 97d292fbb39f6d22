"""Sizes as the report prints them. GB means 2**30 bytes throughout, as nvidia-smi and PyTorch count."""
from __future__ import annotations

GB = 1 << 30


def human_bytes(n: float) -> str:
    for unit, size in (("GB", GB), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"

"""CPU runs and the host's memory: how much is available, and keeping freed memory for reuse.

`available_bytes` is what the weights and the KV pool are checked against before they are
allocated. `keep_freed_memory` keeps freed memory in the process instead of handing it back to
the OS. A prefill step's activations are megabytes to tens of megabytes each (tokens x FFN
width). glibc's malloc serves blocks that large with fresh mmaps and unmaps them when they are
freed, so every such tensor is paid for again in page faults, one per 4 KiB page, when it is
first written. Served from the heap, which is never trimmed, freed blocks are reused as they
are: a prefill through the 100M benchmark preset takes 0.72-0.83x the time (BENCHMARKS.md,
"Keeping freed memory"); decode steps, whose blocks are small or reused already, are unchanged.
The price is that the process keeps its peak memory until it exits, as PyTorch's CUDA caching
allocator does on a GPU.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1  # free memory at the top of the heap beyond which it is given back
M_MMAP_MAX = -4  # how many blocks may be mmapped at once; 0 serves every block from the heap


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every block from its heap and give nothing back below 2 GiB
    free at its top. Process-wide, for the allocations that follow; False (nothing changed)
    where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the process runs on
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def available_bytes() -> int | None:
    """Memory the kernel can hand out without swapping (Linux's MemAvailable); None if unknown.

    Checked before the KV pool is allocated: with Linux's overcommit an allocation larger than
    this can succeed, and zeroing it then gets the process killed with no message at all.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

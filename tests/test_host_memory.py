"""Host memory: freed large blocks come back without page faults (the CLI asks for it on CPU), and
the memory available is read from the kernel."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pagedllama.app import cli
from pagedllama.host_memory import available_bytes

# In a process of its own: the setting is process-wide and cannot be undone.
FAULTS_BEFORE_AND_AFTER = textwrap.dedent("""
    import resource
    import torch
    from pagedllama.host_memory import keep_freed_memory

    def faults_writing_a_fresh_64_mib_tensor():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20)  # allocated, written, freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    before = [faults_writing_a_fresh_64_mib_tensor() for _ in range(4)]
    kept = keep_freed_memory()
    # the heap grows until a freed block fits the next aligned request; from then on it is reused
    after = [faults_writing_a_fresh_64_mib_tensor() for _ in range(16)]
    print(min(before), kept, max(after[-4:]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", FAULTS_BEFORE_AND_AFTER], capture_output=True, text=True,
                         check=True, timeout=120, cwd=Path(__file__).resolve().parent.parent).stdout.split()
    before, kept, after = int(out[0]), out[1], int(out[2])
    assert kept == "True"
    assert before > 0  # glibc mmaps a block this large afresh each time: 16,384 faults in 4 KiB pages
    assert after * 100 < before


def test_the_cli_keeps_freed_memory_on_cpu(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("kept") or True)
    assert cli.main("paged", ["2", "--simulate", "llama3-8b", "--gpu-memory-gb", "24"]) == 0
    assert calls == ["kept"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/meminfo is Linux's")
def test_available_memory_is_read_from_the_kernel():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    available = available_bytes()
    assert available is not None and 2**20 < available <= total

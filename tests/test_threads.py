"""--threads and its default: one PyTorch thread per core that other processes leave idle."""
from __future__ import annotations

import itertools

import pytest
import torch

from pagedllama.app import cli, threads


class FakeStat:
    """/proc/stat as it reads before and after each sample: cpu0 and cpu1 each gain 100 ticks, of which
    the given number idle."""

    def __init__(self, idle0: int, idle1: int):
        line = "cpu{} {} 0 0 {} 0 0 0 0 0 0"
        self.reads = itertools.cycle(["cpu  0 0 0 0 0 0 0 0 0 0\n" + line.format(0, 1000, 1000) + "\n" + line.format(1, 1000, 1000),
                           "cpu  0 0 0 0 0 0 0 0 0 0\n" + line.format(0, 1100 - idle0, 1000 + idle0) + "\n"
                           + line.format(1, 1100 - idle1, 1000 + idle1)])

    def read_text(self):
        return next(self.reads)


@pytest.fixture
def two_cores(monkeypatch):
    """A machine of two cores, the sample instantaneous, OMP_NUM_THREADS unset; torch's threads restored."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_cpus", lambda: {0, 1})
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield monkeypatch
    torch.set_num_threads(before)


@pytest.mark.parametrize("idle0,idle1,expected", [
    (100, 100, 2),  # an idle machine: every core
    (100, 0, 1),  # another process keeps one core busy: its thread would stall every op
    (100, 70, 1),  # 1.7 cores idle rounds down: a thread too many costs more than one too few
    (90, 95, 2),  # a little noise on an idle machine still counts as idle
    (10, 0, 1),  # everything busy: still one thread
])
def test_default_is_one_thread_per_idle_core(two_cores, idle0, idle1, expected):
    two_cores.setattr(threads, "PROC_STAT", FakeStat(idle0, idle1))
    assert threads.idle_cores() == pytest.approx((idle0 + idle1) / 100)
    chosen = threads.choose_threads(None)
    assert torch.get_num_threads() == expected and chosen.startswith(f"{expected} (")


def test_explicit_choices_are_kept(two_cores):
    assert threads.choose_threads(3) == "3 (--threads)" and torch.get_num_threads() == 3
    two_cores.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    two_cores.setattr(threads, "PROC_STAT", FakeStat(100, 100))  # idle, but the user said 1
    assert threads.choose_threads(None) == "1 (OMP_NUM_THREADS)" and torch.get_num_threads() == 1


def test_without_proc_stat_torch_keeps_its_default(two_cores, tmp_path):
    two_cores.setattr(threads, "PROC_STAT", tmp_path / "missing")
    assert threads.idle_cores() is None
    assert "PyTorch's default" in threads.choose_threads(None)


def test_cli_reports_and_records_the_threads(two_cores, tmp_path, capsys):
    path = tmp_path / "r.json"
    assert cli.main("paged", ["2", "--threads", "1", "--max-new-tokens", "2", "--no-progress", "--json", str(path)]) == 0
    assert "threads: 1 (--threads)" in capsys.readouterr().out
    assert '"threads": 1' in path.read_text()

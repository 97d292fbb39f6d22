"""`python -m pagedllama.compare`: both twins side by side, their limits, and the plots."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import chats, write_byte_checkpoint
from pagedllama.app import cli, compare

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A Meta-format checkpoint (512 bytes of K/V per token in float32) and 12 short conversations whose
    answers are much shorter than the room their prompts leave in a 64-token context."""
    root = tmp_path_factory.mktemp("compare")
    write_byte_checkpoint(root / "model", "meta")
    (root / "data.json").write_text(json.dumps(chats(*[(f"question {i}?", "yes") for i in range(12)])))
    return root / "model", root / "data.json"


def flags(checkpoint: tuple[Path, Path], *extra: str) -> list[str]:
    model, data = checkpoint
    # 0.0001 GB: 3 naive rows of 64 slots, or 13 paged blocks of 16
    return ["--model", str(model), "--data", str(data), "--max-seq-len", "64", "--kv-cache-gb", "0.0001",
            "--no-progress", "--no-answers", *extra]


def test_compare_limits_equal_each_twins_find_max_batch(checkpoint, tmp_path, capsys):
    """compare searches both limits over the dataset's answer lengths, as each twin's --find-max-batch
    does: a checkpoint's requests would otherwise ask for all the room left in the context."""
    doc_path = tmp_path / "compare.json"
    assert compare.main(["2", *flags(checkpoint, "--json", str(doc_path), "--no-plots")]) == 0
    doc = json.loads(doc_path.read_text())
    for twin in ("naive", "paged"):
        twin_path = tmp_path / f"{twin}.json"
        assert cli.main(twin, ["--find-max-batch", *flags(checkpoint, "--json", str(twin_path))]) == 0
        assert doc["max_batch"][twin] == json.loads(twin_path.read_text())["max_batch"][twin]
    # 34-token prompts and 3-token answers take 3 blocks each: 4 requests fit in 13 blocks (asking for the
    # whole 64-token context, 4 blocks each, only 3 would)
    assert doc["max_batch"] == {"naive": 3, "paged": 4}
    assert doc["max_batch_ratio"] == pytest.approx(4 / 3)
    assert "naive 3, paged 4; paged / naive = 1.3x" in capsys.readouterr().out


def test_plots_and_block_size_sweep(checkpoint, tmp_path, monkeypatch, capsys):
    """A batch the naive twin cannot hold: it reports the error, and the memory timeline shows both
    twins at the batch the naive one can hold; the sweep covers the block sizes that fit the context."""
    timelines, figures = [], []
    plot_timelines = compare.plot_timelines
    monkeypatch.setattr(compare, "plot_timelines", lambda runs, *a: timelines.append(runs) or plot_timelines(runs, *a))
    monkeypatch.setattr(compare.plt, "close", figures.append)
    doc_path = tmp_path / "compare.json"
    assert compare.main(["4", *flags(checkpoint, "--json", str(doc_path), "--plots-dir", str(tmp_path))]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(doc_path.read_text())
    assert "did not run" in out and "largest batch that fits is 3" in doc["twins"]["naive"]["error"]
    assert doc["twins"]["paged"]["scheduler"]["peak_running"] == 4
    assert "the memory timeline shows 3 requests" in err
    assert [r.scheduler["peak_running"] for r in timelines[0].values()] == [3, 3]
    assert [r["block_size"] for r in doc["block_size_sweep"]] == [1, 8, 16, 32, 64]
    assert {r["measured_at_batch"] for r in doc["block_size_sweep"]} == {4}
    timeline, sweep = figures
    ax = timeline.axes[0]
    assert "3 requests" in ax.get_title() and ax.get_ylabel() == "KV memory (MB)"  # a 0.0001 GB budget
    assert compare.parser().parse_args(flags(checkpoint)).model in ax.get_title()
    # the twins hold the same tokens at every step: one holding line for both, not one hidden under the other
    assert ax.get_legend_handles_labels()[1] == ["naive: reserved", "paged: reserved", "both: holding tokens",
                                                 "KV budget (0.10 MB)"]
    assert sweep.axes[0].get_title() == "Paged fragmentation at batch 4"
    for name in ("memory_timeline.png", "block_size_sweep.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)


def test_readme_headline_limits_on_the_demo(tmp_path):
    """The README's first table: on the demo's CPU default budget the naive twin holds 6 ShareGPT
    requests at once and the paged twin 82; at 6 requests their KV utilization and fragmentation."""
    doc_path = tmp_path / "compare.json"
    assert compare.main(["6", "--dry-run", "--no-plots", "--no-progress", "--json", str(doc_path)]) == 0
    doc = json.loads(doc_path.read_text())
    assert doc["max_batch"] == {"naive": 6, "paged": 82}
    naive, paged = doc["twins"]["naive"]["memory"], doc["twins"]["paged"]["memory"]
    assert round(100 * naive["peak_utilization"], 1) == 8.0 and round(100 * paged["peak_utilization"], 1) == 97.8
    assert round(100 * naive["fragmented_fraction_of_budget"], 1) == 89.2
    assert round(100 * paged["fragmented_fraction_of_budget"], 2) == 0.21

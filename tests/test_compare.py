"""`python -m pagedllama.compare`: both twins side by side, their limits, and the plots."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import derived_capacity as derived
from conftest import chats, write_byte_checkpoint
from pagedllama.app import cli, compare
from pagedllama.engine.budget import cache_layout, cpu_default_budget
from pagedllama.engine.config import EngineConfig
from pagedllama.model.config import ModelArgs

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A Meta-format checkpoint (512 bytes of K/V per token in float32) and 12 short conversations whose
    answers are much shorter than the room their prompts leave in a 64-token context."""
    root = tmp_path_factory.mktemp("compare")
    write_byte_checkpoint(root / "model", "meta")
    (root / "data.json").write_text(json.dumps(chats(*QUESTIONS)))
    return root / "model", root / "data.json"


QUESTIONS = [(f"question {i}?", "yes") for i in range(12)]
BUDGET = int(0.0001 * derived.GIB)  # --kv-cache-gb 0.0001
SLOT = 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x head dim 16 x float32 (the byte-level checkpoint)


def flags(checkpoint: tuple[Path, Path], *extra: str) -> list[str]:
    model, data = checkpoint
    # 0.0001 GB: 3 naive rows of 64 slots, or 13 paged blocks of 16
    return ["--model", str(model), "--data", str(data), "--max-seq-len", "64", "--kv-cache-gb", "0.0001",
            "--no-progress", "--no-answers", *extra]


def tiny_limits() -> tuple[int, int, list[tuple[int, int]]]:
    """The largest batch of each twin on the 12 questions, and their lengths: the byte-level tokenizer
    makes a token of each UTF-8 byte; rows of 64 slots (naive), blocks of 16 (paged)."""
    lengths = derived.request_lengths(QUESTIONS, lambda text: len(text.encode()), 64)
    return (derived.naive_max_batch(BUDGET, SLOT, 64), derived.paged_max_batch(lengths, BUDGET, SLOT, 16), lengths)


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
    naive, paged, lengths = tiny_limits()
    assert lengths[:5] == [(34, 3)] * 5 and BUDGET // SLOT // 16 == 13 and (naive, paged) == (3, 4)
    assert doc["max_batch"] == {"naive": naive, "paged": paged}
    assert doc["max_batch_ratio"] == pytest.approx(paged / naive)
    assert f"naive {naive}, paged {paged}; paged / naive = {paged / naive:.1f}x" in capsys.readouterr().out


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
    naive, _, lengths = tiny_limits()
    assert naive == 3
    num_blocks = BUDGET // (16 * SLOT)
    paged_steps = derived.simulate(lengths[:4], num_blocks, 16, int(derived.WATERMARK * num_blocks))
    assert "did not run" in out and f"largest batch that fits is {naive}" in doc["twins"]["naive"]["error"]
    assert doc["twins"]["paged"]["scheduler"]["peak_running"] == max(s.running for s in paged_steps) == 4
    assert f"the memory timeline shows {naive} requests" in err
    assert [r.scheduler["peak_running"] for r in timelines[0].values()] == [naive, naive]
    assert [r["block_size"] for r in doc["block_size_sweep"]] == [1, 8, 16, 32, 64]
    assert {r["measured_at_batch"] for r in doc["block_size_sweep"]} == {4}
    timeline, sweep = figures
    ax = timeline.axes[0]
    assert f"{naive} requests" in ax.get_title() and ax.get_ylabel() == "KV memory (MB)"  # a 0.0001 GB budget
    assert compare.parser().parse_args(flags(checkpoint)).model in ax.get_title()
    # the twins hold the same tokens at every step: one holding line for both, not one hidden under the other
    assert ax.get_legend_handles_labels()[1] == ["naive: reserved", "paged: reserved", "both: holding tokens",
                                                 "KV budget (0.10 MB)"]
    assert sweep.axes[0].get_title() == "Paged fragmentation at batch 4"
    for name in ("memory_timeline.png", "block_size_sweep.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)


def test_readme_headline_limits_on_the_demo(tmp_path):
    """The README's first table: on the demo's CPU default budget, the largest batch each twin holds,
    and at 6 requests their KV utilization and fragmentation, each derived without the package from
    the shipped prompts' lengths, the budget arithmetic and the scheduler's rules (derived_capacity.py)."""
    doc_path = tmp_path / "compare.json"
    assert compare.main(["6", "--dry-run", "--no-plots", "--no-progress", "--json", str(doc_path)]) == 0
    doc = json.loads(doc_path.read_text())
    h = derived.headline()
    assert doc["kv_budget_bytes"] == h.demo_budget
    assert doc["max_batch"] == {"naive": h.naive_max_batch, "paged": h.paged_max_batch}
    naive, paged = doc["twins"]["naive"]["memory"], doc["twins"]["paged"]["memory"]
    for got, want in ((naive, h.naive), (paged, h.paged)):
        assert got["peak_utilization"] == pytest.approx(want.utilization, rel=1e-12)
        assert got["fragmented_fraction_of_budget"] == pytest.approx(want.fragmented_fraction_of_budget, rel=1e-12)


def test_readme_states_the_derived_figures():
    """Every capacity and fragmentation figure the README gives for the shipped data, as derived here:
    a README that drifts from what the code computes fails."""
    h = derived.headline()
    readme = (derived.ROOT / "README.md").read_text()
    budget_mb, ratio, ratio_8b = h.demo_budget / 2**20, h.paged_max_batch / h.naive_max_batch, \
        h.paged_max_batch_8b / h.naive_max_batch_8b
    util, frag = (100 * h.naive.utilization, 100 * h.paged.utilization), \
        (100 * h.naive.fragmented_fraction_of_budget, 100 * h.paged.fragmented_fraction_of_budget)
    stated = [
        f"| demo model, CPU default budget ({budget_mb:.0f} MB), 6 ShareGPT requests: KV utilization at peak "
        f"| {util[0]:.1f}% | {util[1]:.1f}% |",
        f"| same: fragmented memory at peak, % of the KV budget | {frag[0]:.1f}% | {frag[1]:.2f}% |",
        f"| demo model, same budget: largest batch that fits in KV memory | {h.naive_max_batch} "
        f"| {h.paged_max_batch} ({ratio:.1f}x) |",
        f"| Llama 3 8B on a 24 GB GPU (`--simulate`, 8192-token context): largest batch | {h.naive_max_batch_8b} "
        f"| {h.paged_max_batch_8b} ({ratio_8b:.0f}x) |",
        f"python llama3-naive.py {h.naive_max_batch + 1}        # error: ... the largest batch that fits is "
        f"{h.naive_max_batch}\n",
        f"python llama3-naive.py {h.naive_max_batch}        # {frag[0]:.0f}% of its KV memory is reserved but empty\n",
        f"python llama3-naive.py --find-max-batch            # largest batch: {h.naive_max_batch}\n",
        f"python llama3-paged.py --find-max-batch            # largest batch: {h.paged_max_batch}\n",
        f"`sharegpt-filtered.json` ({len(json.loads(derived.DATASET.read_text()))} conversations, "
        f"{len(derived.shipped_conversations())} usable)",
    ]
    for line in stated:
        assert line in readme, f"README.md should state: {line.strip()}"
    lengths = derived.shipped_lengths(derived.DEMO_MAX_SEQ_LEN)
    prompt_mean, answer_mean = (sum(x) / len(lengths) for x in zip(*lengths))
    assert f"(prompts average {prompt_mean:.0f} demo-tokenizer tokens, answers {answer_mean:.0f}," in readme
    testing = (derived.ROOT / "docs" / "testing.md").read_text()
    line = f"({h.naive_max_batch} vs {h.paged_max_batch} requests, {util[0]:.1f}% vs {util[1]:.1f}% KV utilization)"
    assert line in testing, f"docs/testing.md should state: {line}"
    assert f"out of memory at {h.naive_max_batch + 1} requests" in readme

    # "the same budget, 64 requests running at once": the paged twin admits all 64 before any finishes
    slot, block = derived.kv_bytes_per_token(derived.DEMO, 4), 16
    num_blocks = h.demo_budget // (block * slot)
    steps = derived.simulate(derived.shipped_lengths(derived.DEMO_MAX_SEQ_LEN)[:64], num_blocks, block,
                             int(derived.WATERMARK * num_blocks))
    assert steps is not None and max(s.running for s in steps) == 64
    assert "python llama3-paged.py 64       # the same budget, 64 requests running at once\n" in readme


def test_readme_real_model_budget_arithmetic():
    """docs/real-models.md's SmolLM2-135M run: its CPU default budget and both twins' pools follow from the
    model's shape (float32, 8192-token context) alone; the rest of that table is a measured run."""
    slot, context = derived.kv_bytes_per_token(derived.SMOLLM2_135M, 4), 8192
    budget = derived.cpu_default_budget(derived.SMOLLM2_135M, context)
    rows = derived.naive_max_batch(budget, slot, context)
    blocks = budget // (16 * slot)
    assert cpu_default_budget(slot, context).kv_bytes == budget  # the package's budget, on the same shape
    shape = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536)
    layouts = [cache_layout(EngineConfig(twin, shape, context), budget) for twin in ("naive", "paged")]
    assert [layout.num_blocks for layout in layouts] == [rows, blocks]  # the package's pools, same budget
    readme = (derived.ROOT / "docs" / "real-models.md").read_text()
    assert f"| same {rows} requests, default CPU budget {budget / derived.GIB:.2f} GB |" in readme
    assert (f"| pool | {rows} rows x {context} slots ({rows * context * slot / derived.GIB:.2f} GB) "
            f"| {blocks} blocks x 16 slots ({blocks * 16 * slot / derived.GIB:.2f} GB) |") in readme
    assert f"| reserved at peak | {rows * context * slot / derived.GIB:.2f} GB " \
           f"({100 * rows * context * slot / budget:.2f}% of budget) |" in readme
    assert f"yes ({rows} is the naive twin's limit) | {rows} of {rows}; 0, 0; yes ({blocks} blocks left room" in readme

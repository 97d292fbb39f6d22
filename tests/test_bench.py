"""The benchmark harness (bench/common.py, bench/tables.py) does what BENCHMARKS.md says of its method:
runs taking turns step by step, orders reversed each repeat, ratios as medians of paired repeats,
the naive twin serving in waves of its largest batch, and every table copied from a measured run."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def common():
    """bench/common.py in float32 on CPU (bfloat16 rounds differently at other batch sizes), leaving
    the test process as it found it: torch's thread count (the benchmarks set one thread on import)
    and glibc's malloc (they keep freed memory, a process-wide setting that cannot be undone)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_DTYPE", "float32")
        mp.setenv("BENCH_DEVICE", "cpu")
        mp.setenv("BENCH_KEEP_FREED_MEMORY", "0")
        module = load_bench_module("common")
    torch.set_num_threads(threads)
    return module


def test_benchmarks_md_tables_are_the_committed_results(tmp_path):
    """Every table in BENCHMARKS.md is what bench/tables.py makes of bench/results: none typed by
    hand, none left behind by a rerun whose tables were not filled in."""
    tables = load_bench_module("tables")
    filled = []
    for doc in (BENCH.parent / "BENCHMARKS.md", BENCH.parent / "docs" / "making-it-fast.md"):
        copy = tmp_path / doc.name
        copy.write_text(doc.read_text())
        tables.fill(copy)
        assert copy.read_text() == doc.read_text(), f"run `python bench/tables.py --fill {doc.name}`"
        filled += [m.group(2) + "/" + m.group(3) for m in tables.MARKED.finditer(doc.read_text())]
    assert set(filled) >= {"bfloat16/summary", "bfloat16/throughput", "bfloat16/hf_compare", "bfloat16/overhead",
                           "bfloat16/profile_decode", "gpu/gpu", "float32/decode_limit_float32",
                           "float32/decode_limit_bfloat16", "float32/naive_views"}
    for name in filled:
        dtype, _, table = name.partition("/")
        text = tables.render(dtype, table)
        assert "older format" not in text, name
        assert text != "(no results)" or name == "gpu/gpu", name  # no GPU was lent to measure that one


def burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def fake_run(name: str, steps: int, work: float, order: list):
    """A StepRun whose steps record their turn and burn `work` CPU-seconds; returns its timed total."""
    total = 0.0
    for i in range(steps):
        cpu, _ = yield lambda i=i: (order.append((name, i)), burn(work))
        total += cpu
    return total


def test_lockstep_runs_one_step_of_each_in_turn_and_times_each_run_alone(common):
    order = []
    done = common.lockstep({"a": fake_run("a", 2, 0.0, order), "b": fake_run("b", 4, 0.02, order)})
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("b", 2), ("b", 3)]  # b outlasts a, ends alone
    assert done["b"] >= 0.08
    assert done["a"] < 0.01  # b's busy steps, run between a's, are not a's time


def test_repeats_reverse_the_order_every_round(common):
    calls = []
    common.paired({n: (lambda n=n: calls.append(n) or {"cpu": 1.0, "wall": 1.0}) for n in "abc"}, 3,
                  log=lambda _: None)
    assert "".join(calls) == "abccbaabc"

    class Stats:
        def rates(self):
            return {"cpu": 1.0, "wall": 1.0}

    def run(name):
        def steps():
            yield lambda: calls.append(name)
            return Stats()
        return steps

    calls.clear()
    rates, rounds = common.lockstep_repeats({n: run(n) for n in "ab"}, 3, log=lambda _: None)
    assert "".join(calls) == "abbaab" and len(rounds) == 3 and rates["a"]["cpu"] == [1.0] * 3


def test_a_ratio_is_the_median_of_the_paired_repeats(common):
    r = common.ratio_summary([1.0, 10.0, 3.0], [1.0, 2.0, 6.0])  # per repeat: 1, 5, 0.5
    assert r["per_repeat"] == [1.0, 5.0, 0.5]
    assert (r["median"], r["min"], r["max"]) == (1.0, 0.5, 5.0)
    assert r["ratio_of_medians"] == 1.5  # 3 / 2: what an unpaired comparison would report


def test_random_workload_lengths_stay_in_their_ranges(common):
    spec = common.RandomSpec(50, 5, 9, 2, 4, seed=3)
    reqs = common.random_requests(spec)
    assert len(reqs) == 50 and reqs == common.random_requests(spec)
    assert {len(r.prompt_ids) for r in reqs} == set(range(5, 10))
    assert {r.max_new_tokens for r in reqs} == {2, 3, 4}
    assert all(0 <= t < 4096 for r in reqs for t in r.prompt_ids)
    assert common.random_requests(common.RandomSpec(50, 5, 9, 2, 4, seed=4)) != reqs


def test_naive_waves_serve_in_batches_of_their_own_caches_and_match_one_paged_batch(common):
    reqs = common.sharegpt_requests(5, cap=6)
    model = common.load_model("demo")
    waves = common.naive_waves(model, "demo", reqs, 2, common.budget_for_rows("demo", 2))
    paged = common.engine_steps(model, common.make_cache("paged", "demo", reqs, common.budget_for_rows("demo", 5)),
                                reqs)
    done = common.lockstep({"naive": waves, "paged": paged})
    naive = done["naive"]
    assert [p.peak_running for p in naive.parts] == [2, 2, 1]
    assert naive.output_tokens == done["paged"].output_tokens == sum(r.max_new_tokens for r in reqs)
    assert naive.steps == sum(p.steps for p in naive.parts)
    assert naive.cpu_seconds == pytest.approx(sum(p.cpu_seconds for p in naive.parts))
    assert naive.outputs == done["paged"].outputs
    assert done["paged"].peak_running == 5 and done["paged"].preemptions == 0

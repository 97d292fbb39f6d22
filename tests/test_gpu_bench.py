"""bench/gpu.py, the GPU measurements, checked here through its --smoke run: the same code on a tiny
shape, Triton's kernel under its CPU interpreter. What it computes must hold before a GPU runs it."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pagedllama.model.config import ModelArgs


GPU_BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    # Looked up, not imported: triton reads TRITON_INTERPRET at its first import (test_triton_attention sets it).
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the smoke run's kernel part needs it)")
    out = tmp_path_factory.mktemp("gpu") / "smoke.json"
    subprocess.run([sys.executable, str(GPU_BENCH), "--smoke", "--out", str(out)], check=True, capture_output=True,
                   timeout=300)
    return json.loads(out.read_text())


def test_paged_kernel_agrees_with_sdpa_on_the_contiguous_cache(smoke):
    TINY = ModelArgs(**smoke["args"])
    assert [(r["batch"], r["context"]) for r in smoke["kernel"]] == [(1, 40), (3, 40)]
    for r in smoke["kernel"]:
        assert r["max_abs_diff"] < 1e-4
        assert r["kv_bytes"] == 2 * r["batch"] * r["context"] * TINY.n_kv_heads * TINY.head_dim * 4  # float32 here
        assert r["paged_bytes_per_s"] == pytest.approx(r["kv_bytes"] / (r["paged_us"] / 1e6))


def test_every_twin_backend_and_pool_gives_the_reference_tokens(smoke):
    """Both twins through each backend (Triton in its interpreter here, also through the CUDA graphs'
    static buffers; flex, in its own part, compiled for the CPU), ample and tight pools, recompute and
    swap: every request as the reference."""
    assert smoke["flex"]["problem"] is None
    runs = smoke["correct"] + smoke["flex"]["correct"]
    assert not [r["error"] for r in runs if "error" in r]
    assert {r["model"] for r in runs} == {"small float32", "large float32"}
    assert {(r["twin"], r["attention"], r["cuda_graphs"]) for r in runs} == {
        (t, a, g) for t in ("naive", "paged") for a in ("torch", "triton", "flex") for g in (False, a == "triton")}
    assert all(r["preemptions"] > 0 for r in runs if r["pool"] == "tight")
    assert {r["preemption"] for r in runs if r["pool"] == "tight"} == {"recompute", "swap"}
    for r in runs:
        assert r["identical_to_reference"] == r["identical_to_first_run"] == r["requests"] == 3
        assert r["tokens_before_divergence"] == r["tokens"] == 4 + 3 + 5


def test_decode_floor_is_the_larger_of_bytes_and_flops(smoke):
    TINY = ModelArgs(**smoke["args"])
    weights = (TINY.num_params() - TINY.vocab_size * TINY.dim) * 4
    assert smoke["weight_bytes_read"] == weights
    assert {(r["twin"], r["batch"]) for r in smoke["decode"]} == {(t, b) for t in ("paged", "naive") for b in (1, 3)}
    for r in smoke["decode"]:
        assert r["kv_bytes_read"] == r["batch"] * r["mean_context"] * TINY.kv_bytes_per_token(4)
        by_bytes = (weights + r["kv_bytes_read"]) / smoke["copy_bytes_per_s"]
        by_flops = 2 * (weights / 4) * r["batch"] / smoke["matmul_flops_per_s"]
        assert r["floor_ms"] == pytest.approx(1e3 * max(by_bytes, by_flops))
        assert r["step_ms_range"][0] <= r["step_ms"] <= r["step_ms_range"][1]
        assert not r["cuda_graphs"] and "tokens" not in r  # no CUDA here: eager only; tokens compared, not kept


def test_same_budget_runs_each_twin_at_its_largest_batch(smoke):
    [r] = smoke["same_budget"]  # eager only without CUDA
    assert r["naive_batch"] == 6  # 6.19 preallocations, as Llama 3 8B on a 24 GB GPU
    assert r["naive_batch"] < r["paged_batch"] == r["requests"] <= 10
    assert r["output_tokens"] == r["requested_tokens"] <= 4 * r["requests"]  # answers capped at 4
    assert r["paged_tok_per_s"] > 0 and r["naive_tok_per_s"] > 0


def test_tables_render_the_results(smoke):
    sys.path.insert(0, str(GPU_BENCH.parent))
    import tables

    text = tables.gpu(smoke)
    assert "flash-attn did not run" in text  # not installable here: the reason is in the results
    assert "| 3 | 40 |" in text and "| naive | 3 | torch | no |" in text and "same KV budget" in text
    assert "| small float32 | paged | triton | yes | tight | recompute | 1 | **3/3** |" in text
    assert "| small float32 | naive | flex | no | ample | recompute | 0 | **3/3** |" in text
    flex = smoke["flex"]["kernel"][1]
    paged = smoke["kernel"][1]
    assert f"| 3 | 40 | {flex['flex_us']:.0f} | **{flex['flex_us'] / paged['paged_us']:.2f}** |" in text
    failed = {**smoke, "flex": {"problem": None, "correct": [{**smoke["flex"]["correct"][0], "error": "NoValidChoicesError: x"}],
                                "kernel": [{"batch": 1, "context": 40, "error": "ValueError: tiles"}]}}
    text = tables.gpu(failed)
    assert "failed: `NoValidChoicesError: x`" in text and "failed: `ValueError: tiles`" in text
    assert "flex did not run: `g++ missing`" in tables.gpu({**smoke, "flex": {"problem": "g++ missing", "correct": [],
                                                                               "kernel": []}})


def test_flex_part_checks_its_kernel_against_sdpa(smoke):
    assert [(r["batch"], r["context"]) for r in smoke["flex"]["kernel"]] == [(1, 40), (3, 40)]
    assert all(r["max_abs_diff"] < 1e-4 and r["flex_us"] > 0 for r in smoke["flex"]["kernel"])


def test_flash_part_records_why_it_did_not_run(smoke):
    assert smoke["flash"]["available"] is False and "flash_attn" in smoke["flash"]["error"]


def test_without_a_gpu_the_full_run_says_so():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is here")
    run = subprocess.run([sys.executable, str(GPU_BENCH)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "needs a CUDA GPU" in run.stderr and "Traceback" not in run.stderr


def test_parts_finish_an_existing_results_file(smoke, tmp_path):
    """A run cut short on a lent GPU is finished with --parts: the parts run are replaced, the rest kept;
    a file measured on another shape or device is refused."""
    out = tmp_path / "gpu.json"
    out.write_text(json.dumps({**smoke, "kernel": "kept", "same_budget": "stale"}))
    subprocess.run([sys.executable, str(GPU_BENCH), "--smoke", "--parts", "budget", "--out", str(out)], check=True,
                   capture_output=True, timeout=300)
    doc = json.loads(out.read_text())
    assert doc["kernel"] == "kept" and doc["decode"] == smoke["decode"]
    assert doc["same_budget"][0]["paged_batch"] == smoke["same_budget"][0]["paged_batch"]

    out.write_text(json.dumps({**smoke, "args": {**smoke["args"], "dim": 4096}}))
    run = subprocess.run([sys.executable, str(GPU_BENCH), "--smoke", "--parts", "budget", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "measured with another args" in run.stderr

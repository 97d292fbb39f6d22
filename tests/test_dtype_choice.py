"""--dtype auto: bfloat16 on GPU; on CPU bfloat16 only with AMX and a measurement that says it is faster."""
from __future__ import annotations

import json

import pytest
import torch

from pagedllama.app import cli, compare, dtype_choice
from pagedllama.app.dtype_choice import (DTYPES, MEASURE_FLOPS, MEASURE_WEIGHT_ELEMENTS, MatmulShape,
                                         largest_layer_matmul, resolve_dtype, time_matmul)
from pagedllama.errors import UsageError
from pagedllama.model.config import DEMO_ARGS, NAMED_SHAPES
from pagedllama.model.parallel import TensorParallel

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
NO_AMX_REASON = "float32 (auto: this CPU has no AMX for bfloat16 matmuls)"


def must_not_run(*args, **kwargs):
    raise AssertionError("called, but the decision needs no measurement here")


class FakeTimer:
    """time_matmul with given seconds per dtype; records the shapes timed."""

    def __init__(self, bf16_s: float, fp32_s: float):
        self.seconds = {torch.bfloat16: bf16_s, torch.float32: fp32_s}
        self.shapes: list[MatmulShape] = []

    def __call__(self, shape: MatmulShape, dtype: torch.dtype) -> float:
        self.shapes.append(shape)
        return self.seconds[dtype]


@pytest.fixture
def amx(monkeypatch):
    """A CPU with AMX; the test sets the timer."""
    monkeypatch.setattr(dtype_choice, "has_amx_bf16", lambda: True)
    return monkeypatch


def test_no_amx_is_float32_without_timing(monkeypatch):
    monkeypatch.setattr(dtype_choice, "has_amx_bf16", lambda: False)
    monkeypatch.setattr(dtype_choice, "time_matmul", must_not_run)
    choice = resolve_dtype("auto", CPU, must_not_run, 64)  # not even the model's shape is read
    assert choice.dtype == torch.float32 and choice.reason == NO_AMX_REASON


def test_amx_and_bfloat16_faster_is_bfloat16(amx):
    timer = FakeTimer(bf16_s=0.21e-3, fp32_s=0.43e-3)
    amx.setattr(dtype_choice, "time_matmul", timer)
    choice = resolve_dtype("auto", CPU, lambda: DEMO_ARGS, 64)
    assert choice.dtype == torch.bfloat16
    assert choice.reason == (f"bfloat16 (auto: AMX; at batch 64 a {DEMO_ARGS.dim}x{DEMO_ARGS.hidden_dim} matmul took "
                             "0.21 ms in bfloat16 vs 0.43 ms in float32)")
    assert timer.shapes == [MatmulShape(64, DEMO_ARGS.dim, DEMO_ARGS.hidden_dim, DEMO_ARGS.hidden_dim)] * 2


@pytest.mark.parametrize("bf16_s", [0.5e-3, 0.43e-3])  # slower, or no faster
def test_amx_and_bfloat16_not_faster_is_float32(amx, bf16_s):
    amx.setattr(dtype_choice, "time_matmul", FakeTimer(bf16_s=bf16_s, fp32_s=0.43e-3))
    choice = resolve_dtype("auto", CPU, lambda: DEMO_ARGS, 3)
    assert choice.dtype == torch.float32
    assert choice.reason.startswith("float32 (auto: AMX, but at batch 3 a ") and "vs 0.43 ms in float32)" in choice.reason


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("name", list(DTYPES))
def test_an_explicit_dtype_is_never_overridden(amx, device, name):
    amx.setattr(dtype_choice, "time_matmul", must_not_run)
    amx.setattr(torch.cuda, "is_bf16_supported", must_not_run)
    choice = resolve_dtype(name, device, must_not_run, 64)
    assert choice.dtype == DTYPES[name] and choice.reason == f"{name} (--dtype)"


@pytest.mark.parametrize("bf16,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_auto_is_bfloat16_where_the_gpu_has_it(amx, bf16, expected):
    amx.setattr(dtype_choice, "time_matmul", must_not_run)
    amx.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    choice = resolve_dtype("auto", CUDA, must_not_run, 64)
    assert choice.dtype == expected and choice.reason.startswith(f"{str(expected)[6:]} (auto: the GPU ")


def test_unknown_dtype_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown --dtype 'fp8'; choose auto, bfloat16, float16, float32"):
        resolve_dtype("fp8", CPU, must_not_run, 1)


@pytest.mark.parametrize("shape", ["llama3-8b", "llama3-70b", "llama3.2-1b"])
@pytest.mark.parametrize("batch", [1, 64, 512])
def test_the_timed_matmul_stays_cheap_for_any_model(shape, batch):
    args = NAMED_SHAPES[shape]
    m = largest_layer_matmul(args, batch)
    assert (m.rows, m.inner, m.full_cols) == (batch, args.dim, args.hidden_dim)
    assert 1 <= m.cols <= m.full_cols and m.inner * m.cols <= MEASURE_WEIGHT_ELEMENTS
    assert 2 * m.rows * m.inner * m.cols <= MEASURE_FLOPS or m.cols == 1
    assert f"a {args.dim}x{args.hidden_dim} matmul ({m.cols} of its columns)" in m.describe()


def test_a_small_model_is_timed_whole_and_a_rank_times_its_share():
    assert largest_layer_matmul(DEMO_ARGS, 4).cols == DEMO_ARGS.hidden_dim
    assert largest_layer_matmul(DEMO_ARGS, 4, TensorParallel(0, 2)).full_cols == DEMO_ARGS.hidden_dim // 2


def test_time_matmul_times_the_real_product():
    assert 0 < time_matmul(MatmulShape(2, 16, 8, 8), torch.float32, repeats=3) < 1


class FakeRanks(TensorParallel):
    """Rank 1 of 2 whose broadcast delivers `rank0` (1: bfloat16)."""

    def __init__(self, rank0: int):
        super().__init__(1, 2, 2)
        object.__setattr__(self, "rank0", rank0)

    def from_rank0(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.rank0])


@pytest.mark.parametrize("rank0,expected", [(1, torch.bfloat16), (0, torch.float32)])
def test_every_rank_takes_rank_0s_choice(amx, rank0, expected):
    amx.setattr(dtype_choice, "time_matmul", must_not_run)  # rank 1 measures nothing
    choice = resolve_dtype("auto", CPU, must_not_run, 8, FakeRanks(rank0))
    assert choice.dtype == expected and choice.reason.endswith("(auto: rank 0's choice)")


@pytest.fixture
def data(tmp_path):
    """Three short prompts: the shipped dataset takes seconds to tokenize for --find-max-batch."""
    path = tmp_path / "three.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"Question {i}?"}]} for i in range(3)]))
    return str(path)


def run_cli(capsys, tmp_path, data, *flags: str) -> tuple[str, dict]:
    doc = tmp_path / "run.json"
    assert cli.main("paged", [*flags, "--data", data, "--max-new-tokens", "2", "--no-progress", "--json", str(doc)]) == 0
    return capsys.readouterr().out, json.loads(doc.read_text())


def test_the_startup_line_says_why_float32(capsys, tmp_path, data):
    out, doc = run_cli(capsys, tmp_path, data, "2")
    assert f"; cpu, {NO_AMX_REASON}; threads: " in out
    assert doc["dtype"] == "float32" and doc["dtype_reason"] == NO_AMX_REASON


def test_auto_times_at_the_batch_asked_before_the_weights_load(amx, capsys, tmp_path, data):
    events, timer = [], FakeTimer(bf16_s=1e-3, fp32_s=2e-3)
    amx.setattr(dtype_choice, "time_matmul", lambda shape, dtype: events.append("time") or timer(shape, dtype))
    load = cli.load
    amx.setattr(cli, "load", lambda *a, **k: events.append("load") or load(*a, **k))
    out, doc = run_cli(capsys, tmp_path, data, "3")
    assert events == ["time", "time", "load"] and {s.rows for s in timer.shapes} == {3}
    reason = "bfloat16 (auto: AMX; at batch 3 a 256x768 matmul took 1.00 ms in bfloat16 vs 2.00 ms in float32)"
    assert f"; cpu, {reason}; threads: " in out
    assert doc["dtype"] == "bfloat16" and doc["dtype_reason"] == reason


def test_find_max_batch_alone_times_batch_1(amx, capsys, data):
    timer = FakeTimer(bf16_s=3e-3, fp32_s=2e-3)
    amx.setattr(dtype_choice, "time_matmul", timer)
    assert cli.main("paged", ["--find-max-batch", "--data", data, "--no-progress"]) == 0
    assert {s.rows for s in timer.shapes} == {1} and "; cpu, float32 (auto: AMX, but at batch 1 " in capsys.readouterr().out


def test_compare_decides_once_for_both_twins(amx, capsys, tmp_path, data):
    timer, doc = FakeTimer(bf16_s=1e-3, fp32_s=2e-3), tmp_path / "compare.json"
    amx.setattr(dtype_choice, "time_matmul", timer)
    assert compare.main(["2", "--data", data, "--dry-run", "--no-plots", "--no-progress", "--json", str(doc)]) == 0
    assert len(timer.shapes) == 2 and {s.rows for s in timer.shapes} == {2}
    assert "; cpu, bfloat16 (auto: AMX; at batch 2 " in capsys.readouterr().out
    doc = json.loads(doc.read_text())
    assert doc["dtype"] == "bfloat16" and doc["dtype_reason"].startswith("bfloat16 (auto: AMX; at batch 2 ")

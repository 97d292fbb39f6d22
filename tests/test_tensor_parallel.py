"""Tensor parallelism on CPU: 2 gloo ranks (this process and one it spawns) against one process.

Greedy float32 tokens must be the single process's, for both twins, under preemption by recompute
and by swap, with parallel samples and prefix caching, and from a Meta checkpoint of 2 shards read
one per rank; a rank that fails, dies or hangs must end the run with one line and leave no process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import sys
import time
import uuid
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import BYTE_ARGS, chats, default_sigint, tokenizer_bytes
from checkpoint_writers import meta_params, save_hf, save_meta
from pagedllama.app import cli
from pagedllama.app.launch import WATCHDOG_THREAD
from pagedllama.io.checkpoint import load_weights, random_state_dict, shard_state_dict
from pagedllama.model.config import ModelArgs
from pagedllama.model.model import Transformer
from pagedllama.model.parallel import TensorParallel
from pagedllama.units import human_bytes
from test_gguf import write_gguf

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = ["--system-prompt", "You are a helpful assistant who answers briefly."]


def run_json(tmp_path: Path, twin: str, argv: list[str], size: int) -> dict:
    path = tmp_path / f"{twin}-{size}-{uuid.uuid4().hex}.json"
    status = cli.main(twin, [*argv, "--no-progress", "--json", str(path), "--tensor-parallel-size", str(size)])
    assert status == 0
    return json.loads(path.read_text())


def tokens(doc: dict) -> list:
    return [(r["id"], r.get("sample_index"), r["output_token_ids"], r["finish_reason"]) for r in doc["requests"]]


@pytest.mark.parametrize("twin, argv", [
    ("naive", ["3", "--max-new-tokens", "12"]),
    ("paged", ["6", "--num-blocks", "130", "--max-new-tokens", "64"]),  # preempted, recomputed
    ("paged", ["6", "--num-blocks", "130", "--max-new-tokens", "64", "--preemption", "swap"]),
    ("paged", ["3", "--n", "2", "--enable-prefix-caching", *SYSTEM, "--max-new-tokens", "12"]),
    ("paged", ["2", "--beam-width", "2", "--max-new-tokens", "12"]),
], ids=["naive", "paged-recompute", "paged-swap", "paged-n2-prefix", "paged-beam2"])
def test_two_ranks_generate_the_tokens_of_one(tmp_path, capsys, twin, argv):
    one, two = run_json(tmp_path, twin, argv, 1), run_json(tmp_path, twin, argv, 2)
    assert tokens(two) == tokens(one)
    assert two["scheduler"] == one["scheduler"] and two["memory"] == one["memory"]  # the same decisions
    if "--num-blocks" in argv:
        assert one["scheduler"]["preemptions"] > 0
    if "--enable-prefix-caching" in argv:
        assert two["prefix_cache"] == one["prefix_cache"] and one["prefix_cache"]["cached_tokens"] > 0
    out = capsys.readouterr().out
    assert out.count("KV memory report") == 2  # rank 1 prints nothing
    watching = [t for t in threading.enumerate() if t.name == WATCHDOG_THREAD]
    for t in watching:
        t.join(timeout=1)
    assert not any(t.is_alive() for t in watching)  # its watch over the ranks ended with the run
    pool = one["memory"]["pool_bytes"]
    assert f"  pool per rank                {human_bytes(pool // 2):>10}  2 ranks, each 1/2 of every block's" in out


def write_meta_shards(dest: Path, num_shards: int) -> dict[str, torch.Tensor]:
    sd = random_state_dict(BYTE_ARGS, seed=3)
    save_meta(sd, meta_params(BYTE_ARGS, multiple_of=32, ffn_dim_multiplier=None), dest, num_shards)
    (dest / "tokenizer.model").write_bytes(tokenizer_bytes())
    return sd


def test_a_rank_embeds_the_ids_of_its_vocabulary_range_and_zeros_for_the_others(monkeypatch):
    """Each of 3 ranks holds 100 of 300 embedding rows: an id in its range gets its row, any other
    id zeros (the all-reduce, here left out, sums the ranks' rows into the whole table's)."""
    monkeypatch.setattr(TensorParallel, "all_reduce", lambda self, x: x)
    args = ModelArgs(dim=48, n_layers=1, n_heads=3, n_kv_heads=3, vocab_size=300, hidden_dim=96)
    ids = torch.arange(300)
    for rank in range(3):
        model = Transformer(args, 8, TensorParallel(rank, 3))
        want = torch.zeros(300, 48)
        want[rank * 100:(rank + 1) * 100] = model.tok_embeddings.weight
        assert torch.equal(model._embed_vocab_slice(ids), want)


def test_a_rank_reads_only_its_own_meta_shard(tmp_path):
    sd = write_meta_shards(tmp_path, 2)
    (tmp_path / "consolidated.00.pth").write_bytes(b"rank 1 never reads this")
    got = load_weights(tmp_path, BYTE_ARGS, tp=TensorParallel(1, 2))
    want = shard_state_dict(sd, TensorParallel(1, 2))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("fmt", ["meta-1-file", "meta-4-files", "hf", "hf-bin", "gguf"])
def test_each_format_gives_a_rank_its_slices_of_the_whole(tmp_path, fmt):
    """Meta files other than N are merged and re-split; safetensors are read slice by slice (with HF's
    q/k row order undone per rank); .bin files and GGUFs are read whole, then sliced."""
    sd = random_state_dict(BYTE_ARGS, seed=4)
    if fmt.startswith("meta"):
        save_meta(sd, meta_params(BYTE_ARGS, multiple_of=32, ffn_dim_multiplier=None), tmp_path,
                  int(fmt.split("-")[1]))
        model = tmp_path
    elif fmt.startswith("hf"):
        save_hf(sd, BYTE_ARGS, tmp_path)
        if fmt == "hf-bin":
            (tmp_path / "model.safetensors").rename(tmp_path / "x")
            torch.save(safetensors.torch.load_file(tmp_path / "x"), tmp_path / "pytorch_model.bin")
            (tmp_path / "x").unlink()
        model = tmp_path
    else:
        model = write_gguf(tmp_path / "m.gguf", BYTE_ARGS, sd)
    whole = load_weights(model, BYTE_ARGS)
    for rank in range(2):
        tp = TensorParallel(rank, 2)
        got, want = load_weights(model, BYTE_ARGS, tp=tp), shard_state_dict(whole, tp)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (fmt, rank)


def test_meta_two_shards_on_two_ranks_generate_the_tokens_of_one(tmp_path, capsys):
    write_meta_shards(tmp_path / "m", 2)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(chats(("Hello there, how are you?", "Fine."), ("Name a colour.", "Blue."))))
    argv = ["2", "--model", str(tmp_path / "m"), "--data", str(data), "--max-new-tokens", "10", "--ignore-eos",
            "--max-seq-len", "128"]
    one, two = run_json(tmp_path, "paged", argv, 1), run_json(tmp_path, "paged", argv, 2)
    assert tokens(two) == tokens(one)
    assert "per rank (2 ranks)" in capsys.readouterr().out


def tagged_processes(tag: str) -> list[int]:
    """Live processes started with PAGEDLLAMA_TEST_TAG=tag in their environment (the run and its ranks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"PAGEDLLAMA_TEST_TAG={tag}".encode() in (proc / "environ").read_bytes():
                if (proc / "stat").read_text().split()[2] != "Z":
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def start_run(tmp_path: Path, *extra: str, new_session: bool = False) -> tuple[subprocess.Popen, str]:
    tag = uuid.uuid4().hex
    env = {**os.environ, "PAGEDLLAMA_TEST_TAG": tag, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "llama3-paged.py"), "4", "--max-new-tokens", "400",
                             "--no-progress", "--tensor-parallel-size", "2", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session, preexec_fn=default_sigint)
    return proc, tag


def spawned_rank(proc: subprocess.Popen, tag: str) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        others = [p for p in tagged_processes(tag) if p != proc.pid
                  and b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        if others:
            return others[0]
        time.sleep(0.1)
    raise AssertionError("rank 1 never started")


def finish(proc: subprocess.Popen, tag: str, within: float) -> tuple[int, str]:
    _, err = proc.communicate(timeout=within)
    time.sleep(0.5)
    assert tagged_processes(tag) == []  # no rank left running
    return proc.returncode, err


@pytest.mark.parametrize("sig, words", [(signal.SIGKILL, "rank 1 was killed by signal 9"),
                                        (signal.SIGSTOP, "did not complete within 3 s")], ids=["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_ends_the_run_with_one_line(tmp_path, sig, words):
    proc, tag = start_run(tmp_path, "--dist-timeout", "3")
    rank1 = spawned_rank(proc, tag)
    while not proc.stdout.readline().startswith("KV capacity"):  # generation, and its collectives, begin
        pass
    os.kill(rank1, sig)
    status, err = finish(proc, tag, within=60)
    assert status == 1 and words in err and err.count("\n") == 1 and err.startswith("error: "), err


def test_a_rank_that_fails_ends_the_run_with_its_one_line(tmp_path):
    write_meta_shards(tmp_path / "m", 2)
    (tmp_path / "m" / "consolidated.01.pth").write_bytes(b"truncated")
    proc, tag = start_run(tmp_path, "--model", str(tmp_path / "m"), "--max-seq-len", "128")
    status, err = finish(proc, tag, within=60)
    assert status == 1 and err.count("\n") == 1, err
    assert err.startswith("error: rank 1: cannot read") and "consolidated.01.pth" in err


def test_limits_per_rank_agree_with_one_process_holding_all_ranks_memory(tmp_path, capsys):
    """--kv-cache-gb is per GPU: 2 ranks of G hold the blocks one process of 2G holds, and their
    max-batch search finds the same limit."""
    argv = ["4", "--max-new-tokens", "8", "--find-max-batch"]
    one = run_json(tmp_path, "paged", [*argv, "--kv-cache-gb", "0.04"], 1)
    two = run_json(tmp_path, "paged", [*argv, "--kv-cache-gb", "0.02"], 2)
    assert two["kv_budget_bytes"] == one["kv_budget_bytes"] == 2 * two["kv_budget_bytes_per_rank"]
    assert two["max_batch"] == one["max_batch"] and two["memory"]["num_blocks"] == one["memory"]["num_blocks"]
    assert "per rank: 20.47 MB (1 of the 2 KV heads of every block)" in capsys.readouterr().out


def test_compare_on_two_ranks_reports_what_one_process_does(tmp_path, capsys):
    from pagedllama.app import compare

    docs = []
    for size, per_gpu in ((1, "0.02"), (2, "0.01")):  # a small budget keeps the max-batch searches short
        path = tmp_path / f"compare-{size}.json"
        assert compare.main(["3", "--max-new-tokens", "8", "--no-progress", "--no-plots", "--json", str(path),
                             "--kv-cache-gb", per_gpu, "--tensor-parallel-size", str(size)]) == 0
        docs.append(json.loads(path.read_text()))
    assert docs[1] == docs[0]
    assert capsys.readouterr().out.count("compare: 3 requests") == 2  # rank 1 prints nothing


def test_ranks_on_one_machine_check_that_all_their_weights_fit(monkeypatch):
    from pagedllama import host_memory
    from pagedllama.errors import UserError
    from pagedllama.io.loading import check_weights_fit

    monkeypatch.setattr(host_memory, "available_bytes", lambda: 3 << 30)
    check_weights_fit(2 << 30, torch.device("cpu"), torch.float32, TensorParallel(0, 2, local_size=1))
    with pytest.raises(UserError, match="4.00 GB .* 3.00 GB of memory available for the 2 ranks on it"):
        check_weights_fit(2 << 30, torch.device("cpu"), torch.float32, TensorParallel(0, 2, local_size=2))


def test_more_ranks_than_visible_gpus_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main("paged", ["2", "--tensor-parallel-size", "2", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --tensor-parallel-size 2 needs 2 GPUs on this machine but 1 are visible; lower it, "
                   "or spread the ranks over machines with torchrun\n")


def test_torchrun_starts_the_ranks_and_rank_0_alone_reports(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["3", "--max-new-tokens", "8", "--no-progress"]
    one = run_json(tmp_path, "paged", argv, 1)
    path = tmp_path / "torchrun.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), str(ROOT / "llama3-paged.py"), *argv, "--tensor-parallel-size", "2",
                           "--json", str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert tokens(json.loads(path.read_text())) == tokens(one)
    assert done.stdout.count("KV memory report") == 1


def test_every_split_dimension_must_divide():
    from dataclasses import replace

    from pagedllama.errors import UsageError
    from pagedllama.model.config import DEMO_ARGS
    from pagedllama.model.parallel import check_divides

    check_divides(DEMO_ARGS, 2)
    with pytest.raises(UsageError, match="does not divide the model's 4353 vocabulary entries; use one of 1$"):
        check_divides(replace(DEMO_ARGS, vocab_size=4353), 2)
    with pytest.raises(UsageError, match="--tensor-parallel-size 4 does not divide the model's 2 KV heads"):
        check_divides(DEMO_ARGS, 4)


def test_torchrun_with_another_process_count_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main("paged", ["2"]) == 2
    assert capsys.readouterr().err == ("error: torchrun started 2 processes but --tensor-parallel-size is 1; give "
                                       "torchrun --nproc-per-node x --nnodes = --tensor-parallel-size\n")


def test_ctrl_c_stops_every_rank_and_rank_0_still_reports(tmp_path):
    proc, tag = start_run(tmp_path, new_session=True)
    spawned_rank(proc, tag)
    while not proc.stdout.readline().startswith("KV capacity"):
        pass
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends: to every process of the group
    out, err = proc.communicate(timeout=60)
    time.sleep(0.5)
    assert tagged_processes(tag) == []
    assert proc.returncode == 130 and "interrupted after" in out and "KV memory report" in out, err

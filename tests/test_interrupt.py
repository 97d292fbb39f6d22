"""Ctrl-C mid-run keeps what finished, and `--output` streams each request as it ends.

The demo model generates each request's dataset answer length, so a data file with two
one-word answers and two very long ones gives requests that finish at once and requests
that would run for a long while: the moment to press Ctrl-C.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import default_sigint

from pagedllama.app import cli
from pagedllama.engine.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
ANSWER_KEYS = {"id", "prompt_tokens", "output_tokens", "text"}
# One intra-op thread: on a few CPU cores shared with other processes, torch's default thread pool
# spins against them and runs this tiny model tens of times slower.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chat(cid: str, question: str, answer: str) -> dict:
    return {"id": cid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_keeps_finished_requests_and_reports(tmp_path):
    long_answer = " ".join(f"step {i} of the long answer" for i in range(2000))  # capped at the context: ~4000 tokens
    data = tmp_path / "data.json"
    data.write_text(json.dumps([chat("long-1", "Tell me everything.", long_answer), chat("short-1", "Hi?", "ok"),
                                chat("long-2", "And more.", long_answer), chat("short-2", "Yes?", "no")]))
    jsonl, doc_path = tmp_path / "out.jsonl", tmp_path / "out.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "llama3-paged.py"), "4", "--model", "demo", "--data", str(data),
                             "--output", str(jsonl), "--json", str(doc_path), "--no-answers", "--no-progress"],
                            cwd=tmp_path, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 120
        while not (jsonl.is_file() and jsonl.read_text(encoding="utf-8").endswith("\n")):
            assert proc.poll() is None, f"ended before any request finished:\n{proc.communicate()}"
            assert time.monotonic() < deadline, "no request finished within 120 s"
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before Ctrl-C: make the long answers longer"
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert took < 10, f"took {took:.1f} s to stop after Ctrl-C"
    assert "Traceback" not in out + err
    assert "Fragmented Memory:" in out and "interrupted" in out
    assert "held by the requests interrupted mid-run" in out and "finished requests free theirs" not in out

    doc = json.loads(doc_path.read_text(encoding="utf-8"))
    assert doc["interrupted"] is True and doc["batch_size"] == 4 and doc["memory"]["blocks_in_use_after"] > 0
    finished = {r["id"]: r for r in doc["requests"]}
    assert finished and finished.keys() <= {"short-1", "short-2"}  # the long ones were cut off
    lines = read_jsonl(jsonl)  # every line is whole JSON
    assert lines and all(ANSWER_KEYS <= line.keys() for line in lines)
    assert all(line["id"] in finished and line == finished[line["id"]] for line in lines)
    assert f"{len(finished)} of 4 requests finished" in out


def test_output_streams_each_request_as_it_finishes(tmp_path, monkeypatch, capsys, one_thread):
    # Listed longest first, so finish order (the stream's) differs from request order (the --json's).
    data = tmp_path / "data.json"
    data.write_text(json.dumps([chat("a", "First?", "one two three four five six seven eight nine ten " * 2),
                                chat("b", "Second?", "one two three four"), chat("c", "Third?", "ok")]))
    jsonl, doc_path = tmp_path / "out.jsonl", tmp_path / "out.json"

    lines_seen_per_step = []  # how many lines the file holds as each step starts
    step = Engine.step

    def watched_step(self):
        lines_seen_per_step.append(len(jsonl.read_text(encoding="utf-8").splitlines()))
        return step(self)
    monkeypatch.setattr(Engine, "step", watched_step)

    status = cli.main("paged", ["3", "--model", "demo", "--data", str(data), "--max-seq-len", "256", "--output",
                                str(jsonl), "--json", str(doc_path), "--no-answers", "--no-progress"])
    out, err = capsys.readouterr()
    assert status == 0 and err == ""
    assert "interrupted" not in out

    doc = json.loads(doc_path.read_text(encoding="utf-8"))
    lines = read_jsonl(jsonl)
    assert [r["id"] for r in doc["requests"]] == ["a", "b", "c"]
    assert [line["id"] for line in lines] == ["c", "b", "a"]  # as they finished
    assert sorted(lines, key=lambda r: r["id"]) == doc["requests"]
    assert all(ANSWER_KEYS <= line.keys() and line["output_tokens"] > 0 for line in lines)
    assert lines[0]["output_tokens"] < lines[1]["output_tokens"] < lines[2]["output_tokens"]
    # Written and flushed while the run went on, not at its end.
    assert lines_seen_per_step == sorted(lines_seen_per_step)
    assert lines_seen_per_step[-1] == 2 and lines_seen_per_step.index(1) < lines_seen_per_step.index(2)

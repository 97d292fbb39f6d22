"""The figures users compare: the memory report's text, --json's fields, and which answers print."""
from __future__ import annotations

import json

from conftest import chats, write_byte_checkpoint
from pagedllama.app import cli
from pagedllama.app.report import GB, format_memory_report

SLOT = 4096  # bytes of K/V per token in these hand-made reports


def memory(fragmented_tokens: int, blocks_after: int = 0) -> dict:
    budget = 25_344 * SLOT
    return {"budget_bytes": budget, "pool_bytes": budget, "block_size": 16, "num_blocks": 1584,
            "peak_blocks_in_use": 100, "bytes_per_token": SLOT, "peak_reserved_bytes": 1600 * SLOT,
            "peak_used_bytes": (1600 - fragmented_tokens) * SLOT, "peak_fragmented_bytes": fragmented_tokens * SLOT,
            "end_reserved_bytes": 0, "end_used_bytes": 0, "end_fragmented_bytes": 0,
            "blocks_in_use_after": blocks_after, "peak_utilization": 1 - fragmented_tokens / 1600,
            "fragmented_fraction_of_budget": fragmented_tokens * SLOT / budget}


def test_fragmented_memory_keeps_the_original_format_and_shows_mb_below_0_01_gb():
    """The paged demo's 144 fragmented slots of 4 KB are 576 KB: '0.00 GB' alone would say nothing."""
    small = format_memory_report(memory(144), "t").splitlines()[-1]
    assert small.startswith("Fragmented Memory: 0.00 GB (0.57%) = 0.56 MB")
    large = memory(0)
    large.update(peak_fragmented_bytes=3 * GB, fragmented_fraction_of_budget=0.5)
    assert format_memory_report(large, "t").splitlines()[-1].startswith("Fragmented Memory: 3.00 GB (50.00%)  [")


def test_blocks_in_use_after_an_interrupted_run_are_not_said_to_be_freed():
    done = format_memory_report(memory(144), "t")
    cut = format_memory_report(memory(144, blocks_after=37), "t", interrupted=True)
    assert "finished requests free theirs" in done and "interrupted" not in done
    assert "37  of 1584: held by the requests interrupted mid-run" in cut and "free theirs" not in cut


def test_demo_answers_are_hidden_unless_asked_and_real_answers_print(tmp_path, capsys):
    """The demo's random weights write gibberish: its report comes without it unless --answers asks.
    A real model prints its answers, as the original scripts did, unless --no-answers."""
    write_byte_checkpoint(tmp_path / "model", "meta")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(chats(("hi?", "ok"), ("why?", "because"))))
    real = ["2", "--model", str(tmp_path / "model"), "--data", str(data), "--max-seq-len", "64",
            "--max-new-tokens", "2", "--no-progress"]
    demo = ["2", "--max-new-tokens", "2", "--no-progress"]
    shown = {}
    for name, argv in (("demo", demo), ("demo --answers", [*demo, "--answers"]), ("real", real),
                       ("real --no-answers", [*real, "--no-answers"])):
        assert cli.main("paged", argv) == 0
        out = capsys.readouterr().out
        shown[name] = out.count("generated (length)")
        assert "KV memory report" in out
    assert shown == {"demo": 0, "demo --answers": 2, "real": 2, "real --no-answers": 0}


def test_json_holds_token_ids_fractions_and_the_timeline(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert cli.main("paged", ["3", "--max-new-tokens", "5", "--no-progress", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    for answer in doc["requests"]:
        assert len(answer["prompt_token_ids"]) == answer["prompt_tokens"]
        assert len(answer["output_token_ids"]) == answer["output_tokens"] == 5
    m = doc["memory"]
    assert m["fragmented_fraction_of_budget"] == m["peak_fragmented_bytes"] / m["budget_bytes"] < 1
    assert not any(key.endswith("_pct") for key in m)
    timeline = doc["timeline"]
    assert len(timeline["reserved_bytes"]) == doc["steps"] == 5  # one prefill step, four decode steps
    assert max(timeline["reserved_bytes"]) == m["peak_reserved_bytes"]
    assert timeline["running"] == [3] * 5 and timeline["waiting"] == [0] * 5

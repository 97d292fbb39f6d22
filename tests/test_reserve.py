"""The naive twin's reservation policies through the engine (issue 26): the four parts hand-computed
for each category, summing to the budget at every step of real and dry runs, dry runs equal to
real ones step for step, the same tokens under every policy, and bad input as one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, chats, random_requests, write_byte_checkpoint
from pagedllama.app import cli
from pagedllama.app.capacity import dry_run, find_max_batch
from pagedllama.engine.config import EngineConfig
from pagedllama.engine.engine import build_engine
from pagedllama.engine.sequence import Request
from pagedllama.engine.waste import PARTS
from pagedllama.errors import UserError
from pagedllama.model.attention import TorchAttention

SLOT = TINY.kv_bytes_per_token(4)
TOKENS, RESERVATION, INTERNAL, EXTERNAL, FREE = range(len(PARTS))


def config(reserve: str = "max", twin: str = "naive", max_seq_len: int = 128, **options) -> EngineConfig:
    return EngineConfig(twin, TINY, max_seq_len, ignore_eos=True, reserve=reserve, **options)


def run(cfg: EngineConfig, budget_slots: int, requests: list[Request], model=None):
    engine = build_engine(cfg, budget_slots * SLOT, requests, model, TorchAttention() if model else None)
    result = engine.run(requests, progress=False)
    return engine, [s.output_ids for s in result.sequences]


def test_a_hole_that_fits_no_request_is_external_fragmentation():
    """A 100-slot budget: six 16-slot blocks and 4 slots left over. oracle reserves the slots each request
    writes, prompt + answer - 1: r0 and r2 one block (16 + 1 - 1), r1 four (40 + 25 - 1 = 64), r3 two
    (30 + 3 - 1 = 32). r0, r1, r2 fill the region; r0 and r2 finish after the prefill and leave two
    one-block holes either side of r1: r3 fits the 2 free blocks but no hole, and waits until r1 ends."""
    requests = [Request("r0", list(range(16)), 1), Request("r1", list(range(40)), 25),
                Request("r2", list(range(16)), 1), Request("r3", list(range(30)), 3)]
    engine, _ = run(config("oracle"), 100, requests)
    b = engine.waste
    assert engine.block_manager.layout.num_blocks == 6 and b.budget_slots == 100
    # step 0, the prefill of r0, r1, r2: r1 will write 24 more slots; nothing is free but the leftover
    assert b.parts[0].tolist() == [16 + 40 + 16, 24, 0, 0, 4]
    # step 1: r1 decodes; the 32 free slots of the region are two 16-slot holes, r3 needs 32 in one
    assert b.parts[1].tolist() == [41, 23, 0, 32, 4]
    # r1 writes its last slot at step 24 (40 + 24 = 64); r3 is admitted at step 25
    assert b.parts[24].tolist() == [64, 0, 0, 32, 4]
    assert b.hole_waits == 24
    assert b.parts[25].tolist() == [30, 2, 0, 0, 68]  # r3 alone: 30 + 3 - 1 = 32 slots, 2 still to write
    assert engine.scheduler.stats.waited_for_memory == 1


@pytest.mark.parametrize("reserve, size, internal", [
    ("max", 128, 128 - 64),  # one row of max_seq_len
    ("pow2", 80, 80 - 64),  # 40 + 32 = 72 slots, 5 blocks of 16: 8 over-reserved, 8 rounding
    ("oracle", 64, 0),  # 40 + 25 - 1 = 64: exactly what it writes
])
def test_reservation_and_internal_fragmentation_per_policy(reserve, size, internal):
    """One request of 40 prompt tokens and a 25-token answer writes 64 slots (the last token's K/V never)."""
    engine, _ = run(config(reserve), 300, [Request("r", list(range(40)), 25)])
    b = engine.waste
    assert b.parts[0].tolist() == [40, 24, internal, 0, 300 - size]
    assert b.parts[-1].tolist() == [64, 0, internal, 0, 300 - size]


def test_paged_twin_reserves_only_inside_its_last_block():
    """The paged twin's units are blocks: at the prefill, 40 tokens fill 2.5 blocks and the third block's
    8 empty slots will be written (reservation); no block ever holds a slot it does not write."""
    engine, _ = run(config(twin="paged"), 300, [Request("r", list(range(40)), 25)])
    b = engine.waste
    assert b.parts[0].tolist() == [40, 8, 0, 0, 300 - 48]
    assert b.parts[-1].tolist() == [64, 0, 0, 0, 300 - 64]
    assert (b.parts[:, RESERVATION] < 16).all() and (b.parts[:, INTERNAL] == 0).all()


SYSTEMS = [config("max"), config("pow2"), config("oracle"), config(twin="paged")]
LENGTHS = [(13, 9), (40, 30), (7, 2), (25, 17), (60, 40), (5, 11)]


@pytest.mark.parametrize("cfg", SYSTEMS, ids=["max", "pow2", "oracle", "paged"])
def test_parts_sum_to_the_budget_and_agree_with_the_memory_tracker(cfg):
    """Every step: the five parts make the budget, token states are the tracker's slots holding tokens,
    and token states + reservation + internal fragmentation are its reserved slots. A budget where
    pow2 and oracle must wait for holes (and the paged twin preempts)."""
    requests = random_requests(LENGTHS, TINY.vocab_size)
    budget = len(requests) * 128 if cfg.reserve == "max" and cfg.twin == "naive" else 150
    engine, _ = run(cfg, budget, requests)
    parts = engine.waste.parts
    assert (parts.sum(axis=1) == budget).all() and (parts >= 0).all()
    timeline = engine.memory.timeline
    assert parts[:, TOKENS].tolist() == [s.used_tokens for s in timeline]
    assert parts[:, :EXTERNAL].sum(axis=1).tolist() == [s.reserved_tokens for s in timeline]
    if cfg.reserve != "max":
        assert engine.scheduler.stats.waited_for_memory > 0


def test_paged_units_count_a_shared_block_once():
    """Parallel samples and a cached prefix share blocks: each is one unit, and the parts still match
    the tracker, which counts a shared block's tokens once."""
    requests = [Request("a", list(range(40)), 12, n=3), Request("b", list(range(40)), 9, n=2)]
    engine, _ = run(config(twin="paged", prefix_caching=True), 400, requests)
    parts = engine.waste.parts
    assert (parts.sum(axis=1) == 400).all()
    assert parts[:, TOKENS].tolist() == [s.used_tokens for s in engine.memory.timeline]


@pytest.mark.parametrize("cfg", SYSTEMS, ids=["max", "pow2", "oracle", "paged"])
def test_a_dry_run_equals_the_real_run_step_for_step(cfg, tiny_model):
    requests = random_requests(LENGTHS, TINY.vocab_size, seed=3)
    budget = len(requests) * 128 if cfg.reserve == "max" and cfg.twin == "naive" else 150
    real, _ = run(cfg, budget, requests, tiny_model)
    dry = dry_run(cfg, budget * SLOT, requests)
    assert np.array_equal(real.waste.parts, dry.waste.parts)
    assert real.memory.timeline == dry.timeline


def test_tokens_are_the_same_under_every_policy(tiny_model):
    """A policy changes memory, never the output: max, pow2, oracle and the paged twin generate the
    same greedy tokens (float32), with room for everyone and with pow2 and oracle waiting for holes."""
    requests = random_requests(LENGTHS, TINY.vocab_size, seed=5)
    roomy = len(requests) * 128
    outputs = [run(cfg, roomy, requests, tiny_model)[1] for cfg in SYSTEMS]
    outputs += [run(cfg, 150, requests, tiny_model)[1] for cfg in SYSTEMS[1:3]]
    assert all(o == outputs[0] for o in outputs[1:])
    assert [len(o) for o in outputs[0]] == [n for _, n in LENGTHS]


def test_a_request_outgrowing_its_reservation_is_an_error():
    """Answer lengths that do not match the run (a wrong --oracle-lengths) stop it with one line, never
    a shorter answer."""
    with pytest.raises(UserError, match="outgrew the 42 slots its reservation holds") as error:
        run(config("oracle"), 300, [Request("r", list(range(40)), 10, output_len=3)])
    assert str(error.value).endswith("give --oracle-lengths from a run of the same model and flags, "
                                     "or use --reserve max)")  # and the fix


def test_oracle_without_lengths_for_a_model_that_stops_by_itself():
    cfg = EngineConfig("naive", TINY, 128, reserve="oracle", stop_ids=frozenset({1}))
    with pytest.raises(UserError, match="--oracle-lengths"):
        run(cfg, 300, [Request("r", list(range(40)), 10)])


def test_find_max_batch_per_policy_orders_the_policies():
    """On the same requests: max holds the fewest (a row each), oracle at least as many as pow2, the paged
    twin at least as many as oracle (blocks of 16 lose under 16 slots each, and nothing to holes)."""
    requests = random_requests(LENGTHS * 6, TINY.vocab_size)
    limits = [find_max_batch(cfg, 600 * SLOT, requests)[0] for cfg in SYSTEMS]
    assert limits[0] == 600 // 128
    assert limits[0] <= limits[1] <= limits[2] <= limits[3]


# ---- the command line -------------------------------------------------------------------------

def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


@pytest.mark.parametrize("twin, argv, status, words", [
    ("paged", ["1", "--reserve", "oracle"], 2, "naive twin"),
    ("naive", ["1", "--reserve", "buddy"], 2, "max, pow2, oracle"),
    ("naive", ["1", "--oracle-lengths", "x.json"], 2, "--reserve pow2 or oracle"),
    ("naive", ["1", "--reserve", "max", "--oracle-lengths", "x.json"], 2, "not max"),
    ("naive", ["1", "--reserve", "pow2", "--n", "2"], 2, "--n"),
    ("naive", ["1", "--reserve", "oracle", "--oracle-lengths", "x.json", "--find-max-batch"], 2, "dry runs"),
    ("naive", ["1", "--reserve", "oracle", "--oracle-lengths", "/nonexistent.json"], 1, "--json PATH"),
])
def test_bad_reserve_flags_are_one_line(twin, argv, status, words, capsys):
    assert cli.main(twin, [*argv, "--no-progress", "--max-new-tokens", "2"]) == status
    assert words in one_line_error(capsys)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint that stops by itself (end-of-turn tokens) and a few short conversations."""
    root = tmp_path_factory.mktemp("reserve")
    write_byte_checkpoint(root / "model", "meta")
    (root / "data.json").write_text(json.dumps(chats(*[(f"question {i}?", "yes") for i in range(4)])))
    return root / "model", root / "data.json"


def test_oracle_lengths_from_a_first_run(checkpoint, tmp_path, capsys):
    """A model that stops by itself: oracle needs the lengths (one line naming --oracle-lengths), and
    reserving for a first run's lengths gives that run's tokens."""
    model, data = checkpoint
    common = ["3", "--model", str(model), "--data", str(data), "--max-seq-len", "64", "--max-new-tokens", "12",
              "--no-progress", "--no-answers"]
    assert cli.main("naive", [*common, "--reserve", "oracle"]) == 1
    assert "--oracle-lengths" in one_line_error(capsys)
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert cli.main("paged", [*common, "--json", str(first)]) == 0
    assert cli.main("naive", [*common, "--reserve", "oracle", "--oracle-lengths", str(first),
                              "--json", str(second)]) == 0
    a, b = (json.loads(p.read_text()) for p in (first, second))
    assert [r["output_token_ids"] for r in a["requests"]] == [r["output_token_ids"] for r in b["requests"]]
    waste = b["waste"]
    assert waste["system"] == "naive-oracle" and waste["peak"]["internal_fragmentation"]["bytes"] < 16 * 3 * \
        b["memory"]["bytes_per_token"]  # only the rounding to 16-slot blocks
    for at in ("peak", "average"):
        assert sum(p["share"] for p in waste[at].values()) == pytest.approx(1)


def test_find_max_batch_flag_per_policy(tmp_path):
    """--find-max-batch honours --reserve, and names the policy in --json."""
    out = tmp_path / "run.json"
    args = ["--find-max-batch", "--kv-cache-gb", "0.02", "--json", str(out)]
    assert cli.main("naive", [*args, "--reserve", "pow2"]) == 0
    pow2 = json.loads(out.read_text())["max_batch"]["naive-pow2"]
    assert cli.main("naive", args) == 0
    most = json.loads(out.read_text())["max_batch"]["naive"]
    assert pow2 > most > 0


def test_compare_shows_every_policy_and_the_paged_twin(checkpoint, tmp_path, capsys):
    """compare on a model that stops by itself: pow2 and oracle reserve for the paged run's answer
    lengths (never outgrowing them); the four systems' breakdowns, limits (each the twin's
    --find-max-batch) and the stacked bars."""
    from pagedllama.app import compare
    model, data = checkpoint
    common = ["--model", str(model), "--data", str(data), "--max-seq-len", "64", "--kv-cache-gb", "0.0001",
              "--no-progress", "--no-answers", "--max-new-tokens", "12"]
    doc_path = tmp_path / "compare.json"
    assert compare.main(["3", *common, "--json", str(doc_path), "--plots-dir", str(tmp_path)]) == 0
    doc = json.loads(doc_path.read_text())
    assert list(doc["systems"]) == ["naive", "naive-pow2", "naive-oracle", "paged"]
    for name, system in doc["systems"].items():
        assert system["error"] is None and system["waste"]["system"] == name
        assert sum(p["share"] for p in system["waste"]["average"].values()) == pytest.approx(1)
    oracle_json = tmp_path / "oracle.json"
    assert cli.main("naive", ["--find-max-batch", "--reserve", "oracle", *common, "--json", str(oracle_json)]) == 0
    assert doc["systems"]["naive-oracle"]["max_batch"] == json.loads(oracle_json.read_text())["max_batch"]["naive-oracle"]
    assert (tmp_path / "kv_breakdown.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Orca (Pow2)" in out and "Orca (Oracle)" in out and "paged (vLLM)" in out


def test_readme_states_the_shares_of_memory_in_use(tmp_path):
    """The README's four-part figures for Llama 3 8B on 24 GB (6 requests, averaged over steps, as
    shares of the memory in use) are what each system's dry run computes: a README that drifts fails."""
    shares = {}
    for name, twin, extra in [("max", "naive", []), ("pow2", "naive", ["--reserve", "pow2"]),
                              ("oracle", "naive", ["--reserve", "oracle"]), ("paged", "paged", [])]:
        doc_path = tmp_path / f"{name}.json"
        assert cli.main(twin, ["6", "--simulate", "llama3-8b", "--gpu-memory-gb", "24", "--no-progress",
                               *extra, "--json", str(doc_path)]) == 0
        parts = json.loads(doc_path.read_text())["waste"]["average"]
        used = sum(p["bytes"] for key, p in parts.items() if key != "free")
        shares[name] = round(100 * parts["token_states"]["bytes"] / used)
    demo_path = tmp_path / "demo.json"  # the demo's Max share: a real run (the demo has no named shape)
    assert cli.main("naive", ["6", "--no-progress", "--json", str(demo_path)]) == 0
    parts = json.loads(demo_path.read_text())["waste"]["average"]
    demo_max = round(100 * parts["token_states"]["bytes"] / sum(p["bytes"] for k, p in parts.items() if k != "free"))
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    stated = (f"Max {demo_max}% (demo; 8B's 8192-token rows: {shares['max']}%), Pow2 {shares['pow2']}%, "
              f"Oracle {shares['oracle']}%, paged {shares['paged']}%")
    assert stated in readme, f"README.md should state: {stated}"

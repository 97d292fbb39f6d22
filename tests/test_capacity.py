"""KV memory accounting, budgets, max-batch search and simulation (issue 4)."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch

import derived_capacity as derived
from conftest import CPU, TINY, make_engine, random_requests, tokenizer_bytes
from pagedllama.app import cli
from pagedllama.app.capacity import dry_run, find_max_batch
from pagedllama.app.report import timeline_json
from pagedllama.app.workload import build_requests
from pagedllama.engine.budget import reference_preallocations, simulated_budget
from pagedllama.engine.config import MAX_PREFILL_TOKENS, EngineConfig
from pagedllama.engine.engine import build_engine
from pagedllama.engine.sequence import Request
from pagedllama.errors import OutOfKVMemory, UsageError
from pagedllama.io.data import default_data_path, load_sharegpt
from pagedllama.io.loading import Loaded, installed_llama3_tokenizer
from pagedllama.io.tokenizer import demo_tokenizer, load_tokenizer
from pagedllama.model.attention import TorchAttention
from pagedllama.model.config import DEMO_ARGS, DEMO_MAX_SEQ_LEN, NAMED_SHAPES
from pagedllama.model.model_runner import warmup_forward

F32 = torch.float32
SLOT = TINY.kv_bytes_per_token(4)


def config(twin, args, max_seq_len, dtype=F32, block_size=16) -> EngineConfig:
    """A twin's config as the command line builds it: greedy, every request to its length."""
    return EngineConfig(twin, args, max_seq_len, dtype, CPU, block_size or 16, ignore_eos=True)


def run_checking_every_step(engine, requests):
    """Each time the tracker records a step, recompute its figures from the block tables."""
    cache = engine.block_manager
    record = engine.memory.record
    checked = []

    def record_and_check(running, waiting):
        record(running, waiting)
        sample, running = engine.memory.timeline[-1], engine.scheduler.running
        assert sample.running == len({id(s.group) for s in running})  # requests, not sequences
        assert sample.waiting == len(engine.scheduler.waiting) + len(engine.scheduler.swapped)
        reserved = sum(len(s.block_table) for s in running) * cache.block_size
        assert sample.reserved_tokens == reserved == cache.allocator.num_used * cache.block_size
        assert sample.used_tokens == sum(s.num_cached_tokens for s in running)
        per_seq = [len(s.block_table) * cache.block_size - s.num_cached_tokens for s in running]
        assert sample.fragmented_tokens == sum(per_seq)
        if cache.block_size == cache.max_seq_len:  # naive: the unused tail of each preallocated row
            assert per_seq == [cache.max_seq_len - s.num_cached_tokens for s in running]
        else:  # paged: only the unused end of each last block
            assert all(0 <= f < cache.block_size for f in per_seq)
        checked.append(sample)

    engine.memory.record = record_and_check
    engine.run(requests, progress=False)
    assert len(checked) == len(engine.memory.timeline) > 1
    assert engine.memory.summary(0)["blocks_in_use_after"] == cache.allocator.num_used == 0  # every block freed
    return engine


@pytest.mark.parametrize("twin_block", [None, 1, 16])
def test_reserved_equals_holding_plus_fragmented_every_step(tiny_model, twin_block):
    requests = random_requests([(3, 20), (40, 2), (17, 9)], TINY.vocab_size)
    block = twin_block or 128
    run_checking_every_step(make_engine(tiny_model, block, 3 if twin_block is None else 60, 128, 3), requests)


def test_hand_computed_small_case():
    """Paged, blocks of 4: prompts of 5 and 2 tokens, 3 and 1 new tokens.

    Prefill: 2 + 1 blocks = 12 slots, 7 held. Decode 1: a writes its 6th token (still 2 blocks),
    b writes its 3rd (1 block): 12 reserved, 9 held; b is done. Decode 2 and 3 for a alone:
    7th and 8th tokens, still 2 blocks: 8 reserved. Peak reserved is 12 slots, 7 held.
    Naive with rows of 16: 32 slots reserved up front, 7 held at the peak.
    """
    requests = [Request("a", [1] * 5, 4), Request("b", [2] * 2, 2)]
    paged = dry_run(config("paged", TINY, 16, block_size=4), 1 << 30, requests)
    assert [(s.reserved_tokens, s.used_tokens) for s in paged.timeline] == [(12, 7), (12, 9), (8, 7), (8, 8)]
    assert paged.memory["peak_reserved_bytes"] == 12 * SLOT
    assert paged.memory["peak_used_bytes"] == 7 * SLOT
    assert paged.memory["peak_fragmented_bytes"] == 5 * SLOT
    assert paged.memory["fragmented_fraction_of_budget"] == 5 * SLOT / (1 << 30)  # at the peak, not the end (0)
    naive = dry_run(config("naive", TINY, 16), 1 << 30, requests)
    assert [(s.reserved_tokens, s.used_tokens) for s in naive.timeline] == [(32, 7), (32, 9), (16, 7), (16, 8)]
    # the independent simulation that derives the headline figures agrees with this hand computation
    blocks = (1 << 30) // (4 * SLOT)
    derived_paged = derived.simulate([(5, 4), (2, 2)], blocks, 4, int(derived.WATERMARK * blocks))
    assert [(s.reserved_tokens, s.used_tokens) for s in derived_paged] == [(12, 7), (12, 9), (8, 7), (8, 8)]
    assert [(s.reserved_tokens, s.used_tokens) for s in derived.naive_steps([(5, 4), (2, 2)], 16)] == \
        [(32, 7), (32, 9), (16, 7), (16, 8)]
    assert naive.memory["peak_utilization"] == pytest.approx(7 / 32)


def test_naive_out_of_memory_names_the_largest_batch():
    requests = [Request(str(i), [1] * 4, 4) for i in range(5)]
    with pytest.raises(OutOfKVMemory, match="largest batch that fits is 3"):
        build_engine(config("naive", TINY, 64), 3 * 64 * SLOT + 5, requests)
    with pytest.raises(OutOfKVMemory, match="too small for even one"):
        build_engine(config("naive", TINY, 64), 10, requests)
    with pytest.raises(OutOfKVMemory, match="longest request"):
        build_engine(config("paged", TINY, 64, block_size=4), 4 * SLOT, requests)
    assert build_engine(config("paged", TINY, 64, block_size=4), 8 * SLOT, requests)  # just fits


@pytest.mark.parametrize("twin", ["naive", "paged"])
def test_find_max_batch_boundary_with_real_runs(tiny_model, twin):
    """The search says K; a real run of K requests is all resident, of K+1 is not."""
    requests = random_requests([(30, 30), (5, 60), (50, 10), (20, 40), (8, 8), (40, 25), (12, 50)] * 2,
                               TINY.vocab_size)
    budget, max_len = 200 * SLOT, 96
    k, exhausted = find_max_batch(config(twin, TINY, max_len, block_size=8), budget, requests)
    assert not exhausted and 0 < k < len(requests)

    def real(n):
        engine = build_engine(config(twin, TINY, max_len, block_size=8), budget, requests[:n], tiny_model,
                              TorchAttention())
        engine.run(requests[:n], progress=False)
        return engine.scheduler.stats

    assert real(k).fits_in_memory
    if twin == "naive":
        with pytest.raises(OutOfKVMemory):
            real(k + 1)
    else:
        assert not real(k + 1).fits_in_memory  # it still completes, by waiting or preemption


def test_dry_run_agrees_with_a_real_demo_run():
    """Simulation = the real allocator and scheduler: same memory at every step as a real run."""
    from pagedllama.io.checkpoint import build_model, random_state_dict

    model = build_model(DEMO_ARGS, random_state_dict(DEMO_ARGS, 0), CPU, F32, max_positions=512)
    requests = random_requests([(60, 40), (9, 70), (120, 15), (33, 55), (80, 30)], DEMO_ARGS.vocab_size)
    budget = 220 * DEMO_ARGS.kv_bytes_per_token(4)  # tight: forces waiting and preemption
    for twin, block in (("paged", 16), ("naive", None)):
        batch = requests if twin == "paged" else requests[:1]
        engine = build_engine(config(twin, DEMO_ARGS, 200, block_size=block), budget, batch, model, TorchAttention())
        engine.run(batch, progress=False)
        sim = dry_run(config(twin, DEMO_ARGS, 200, block_size=block), budget, batch)
        assert sim.timeline == engine.memory.timeline
        assert sim.memory == engine.memory.summary(budget)
        assert sim.stats == engine.scheduler.stats
    assert sim.stats is not None


def sharegpt_shaped(num_short: int) -> list[Request]:
    """Traffic shaped like real ShareGPT (REFERENCE.md section 8): the longest prompt (2,674 tokens)
    first, another long one next, both with one-token answers, then median requests (40-token
    prompts, 220-token answers). The two long prompts do not fit one prefill step together, so the
    second is admitted after the first has already finished."""
    assert 2674 + 1500 > MAX_PREFILL_TOKENS
    return random_requests([(2674, 1), (1500, 1)] + [(40, 220)] * num_short, TINY.vocab_size)


def test_a_batch_fits_when_memory_holds_it_not_when_every_request_overlaps():
    """The old definition (every request running at the same step) says batch 2 does not fit:
    the first request finishes before the second starts. Memory says: the median requests all run
    together, so they fit while their peak, 17 blocks each (40 + 219 tokens cached at their last
    step, blocks of 16), stays within the pool; one more and decode must preempt."""
    num_blocks, block = 1200, 16
    budget = num_blocks * block * SLOT
    per_short = -(-(40 + 220 - 1) // block)
    k = 2 + num_blocks // per_short
    requests = sharegpt_shaped(k)

    def run(n):
        return dry_run(config("paged", TINY, 4096, block_size=block), budget, requests[:n])

    pair = run(2).stats
    assert pair.peak_running == 1 and pair.fits_in_memory  # the old definition's "no"
    assert find_max_batch(config("paged", TINY, 4096, block_size=block), budget, requests) == (k, False)
    fits, over = run(k), run(k + 1)
    assert fits.stats.fits_in_memory and fits.stats.waited_for_memory == 0
    assert fits.timeline[1].waiting > 0, "the prefill budget made requests wait a step (not for memory)"
    assert fits.memory["peak_blocks_in_use"] == (k - 2) * per_short <= num_blocks
    assert over.stats.preemptions > 0 and not over.stats.fits_in_memory


def test_requests_queued_while_memory_is_short_are_counted():
    """A pool of 10 blocks of 16: a 100-token prompt takes 7; the next two (60 tokens, 4 blocks each)
    are queued while admission stops for memory, and are counted once each however long they wait."""
    requests = random_requests([(100, 30), (60, 2), (60, 2)], TINY.vocab_size)
    run = dry_run(config("paged", TINY, 256), 10 * 16 * SLOT, requests)
    assert run.stats.waited_for_memory == 2 and run.stats.preemptions == 0 and not run.stats.fits_in_memory
    assert run.timeline[0].waiting == 2


def test_naive_rows_keep_no_watermark():
    """The watermark keeps room for growth; a request in a max_seq_len row never grows, so the naive
    twin admits as many requests as it has rows, even a hundred or more."""
    requests = random_requests([(4, 4)] * 120, TINY.vocab_size)
    run = dry_run(config("naive", TINY, 64), 120 * 64 * SLOT, requests)
    assert run.stats.fits_in_memory and run.stats.peak_running == 120


def test_dry_run_agrees_with_a_real_run_at_the_cli_setting(tmp_path, capsys):
    """The CLI's real demo run and a dry run of the same requests schedule the same steps: prompts
    too long for one prefill step together wait for the next one, in both."""
    prompt = " ".join(f"Tell me about item {i} and why it matters." for i in range(150))
    data = tmp_path / "long.json"
    data.write_text(json.dumps([{"id": f"c{i}", "conversations": [{"from": "human", "value": f"{i}: {prompt}"},
                                                                    {"from": "gpt", "value": "Sure thing."}]}
                                for i in range(4)]))
    path = tmp_path / "r.json"
    code, _, _ = run_cli("paged", ["4", "--data", str(data), "--no-progress", "--json", str(path)], capsys)
    assert code == 0
    doc = json.loads(path.read_text())
    requests = build_requests(load_sharegpt(data)[0], demo_tokenizer(), 4, DEMO_MAX_SEQ_LEN, None, True)
    assert sum(len(r.prompt_ids) for r in requests) > MAX_PREFILL_TOKENS
    sim = dry_run(config("paged", DEMO_ARGS, DEMO_MAX_SEQ_LEN), doc["kv_budget_bytes"], requests)
    assert doc["timeline"] == timeline_json(sim.timeline, sim.memory["bytes_per_token"])
    assert doc["memory"] == sim.memory and doc["scheduler"] == cli.scheduler_json(sim.stats)
    assert doc["timeline"]["waiting"][0] > 0 and doc["scheduler"]["fits_in_memory"]


def test_budget_warm_up_runs_the_backend_and_block_size_that_will_run(tiny_model):
    """On CUDA the KV budget is what a warm-up forward leaves; it goes through the twin's own backend
    and block size (here blocks of 16 and a backend that records what reaches it)."""
    seen = []

    class Recording(TorchAttention):
        def forward(self, q, k, v, k_cache, v_cache, meta, scale):
            seen.append((meta.is_prefill, len(q), k_cache.shape[1]))
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)

    loaded = Loaded(tiny_model, None, TINY, False, 64, "tiny")
    kv_bytes = warmup_forward(config("paged", TINY, loaded.max_seq_len), loaded.model, Recording(), 16)
    assert seen == [(True, 63, 16)] * TINY.n_layers  # the largest prefill step the context allows
    assert kv_bytes == 4 * 16 * SLOT  # 64 slots: 63 prompt tokens and the one generated


def test_named_shapes_have_published_parameter_counts():
    assert NAMED_SHAPES["llama3-8b"].num_params() == 8_030_261_248
    assert NAMED_SHAPES["llama3-70b"].num_params() == 70_553_706_496
    assert NAMED_SHAPES["llama3.2-1b"].num_params() == 1_235_814_400
    assert NAMED_SHAPES["llama3-8b"].kv_bytes_per_token(2) == 128 * 1024


def test_simulated_budget_for_llama3_8b_on_24gb():
    args = NAMED_SHAPES["llama3-8b"]
    b = simulated_budget(args, 24, 0.9, 2)
    weights = 8_030_261_248 * 2
    acts = 4096 * (4 * 4096 + 3 * 14336) * 2
    assert b.kv_bytes == int(24 * 2**30 * 0.9) - weights - acts
    # the naive max batch: whole 8192-token bf16 rows (2 x 32 layers x 8 KV heads x 128 x 2 bytes per token)
    rows = derived.naive_max_batch(derived.llama3_8b_kv_budget(), 2 * 32 * 8 * 128 * 2, 8192)
    assert int(reference_preallocations()) == rows == 6  # ~7 reported
    with pytest.raises(OutOfKVMemory, match="no memory left"):
        simulated_budget(args, 16, 0.9, 2)
    with pytest.raises(UsageError):
        simulated_budget(args, -3, 0.9, 2)


def test_tensor_parallel_plan_for_llama3_70b_on_four_80gb_gpus(capsys):
    """Each GPU holds a quarter of every matrix (norms copied), a quarter of the KV heads and its
    activations; vLLM's rule applies per GPU, and the four GPUs' KV heads make whole blocks."""
    args = NAMED_SHAPES["llama3-70b"]
    norms = (2 * 80 + 1) * 8192
    weights = 2 * (norms + (70_553_706_496 - norms) // 4)
    acts = 4096 * (2 * 8192 + (2 * 8192 + 3 * 28672) // 4) * 2
    per_gpu = int(80 * 2**30 * 0.9) - weights - acts
    assert simulated_budget(args, 80, 0.9, 2, tensor_parallel_size=4).kv_bytes == 4 * per_gpu
    # a GPU's share of each 8192-token bf16 row: 2 x 80 layers x 8 KV heads x 128 x 2 bytes per token, / 4 GPUs
    rows = per_gpu // (8192 * 2 * 80 * 8 * 128 * 2 // 4)
    code, out, _ = run_cli("naive", ["--simulate", "llama3-70b", "--gpu-memory-gb", "80", "--tensor-parallel-size",
                                     "4", "--find-max-batch"], capsys)
    assert code == 0 and f"largest batch that fits in KV memory (naive): {rows}" in out
    assert 55 < rows < 70  # about 40 GB of KV per GPU, 80 KB per token per GPU
    assert f"--tensor-parallel-size 4  # {rows}\n" in (derived.ROOT / "README.md").read_text()  # the README's


def run_cli(twin, argv, capsys):
    try:
        code = cli.main(twin, argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_simulate_and_find_max_batch_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_models", None)  # the demo tokenizer measures, installed or not
    path = tmp_path / "r.json"
    code, out, _ = run_cli("naive", ["--simulate", "llama3-8b", "--gpu-memory-gb", "24", "--find-max-batch",
                                     "--json", str(path)], capsys)
    # derived from the shipped prompts' lengths and the budget arithmetic (the README states them too)
    naive, paged = derived.headline().naive_max_batch_8b, derived.headline().paged_max_batch_8b
    assert code == 0
    assert f"largest batch that fits in KV memory (naive): {naive}" in out
    assert json.loads(path.read_text())["max_batch"] == {"naive": naive}
    code, out, _ = run_cli("paged", ["--simulate", "llama3-8b", "--gpu-memory-gb", "24", "--find-max-batch"], capsys)
    assert code == 0 and f"largest batch that fits in KV memory (paged): {paged}" in out
    code, out, _ = run_cli("paged", ["4", "--simulate", "llama3-8b", "--gpu-memory-gb", "24",
                                     "--json", str(path)], capsys)
    assert code == 0 and "Fragmented Memory:" in out
    assert re.search(r"blocks in use after +0 +of \d+", out)
    doc = json.loads(path.read_text())
    assert doc["scheduler"]["fits_in_memory"] and doc["memory"]["block_size"] == 16


def simulated_timeline(tokenizer, budget: int) -> dict:
    """The memory timeline of a dry run of the shipped data's first 4 requests, measured with `tokenizer`,
    as `--simulate llama3-8b` plans them."""
    requests = build_requests(load_sharegpt(default_data_path())[0], tokenizer, 4, 8192, None, True)
    run = dry_run(config("paged", NAMED_SHAPES["llama3-8b"], 8192, torch.bfloat16), budget, requests)
    return timeline_json(run.timeline, run.memory["bytes_per_token"])


def simulate_4(tmp_path, capsys) -> tuple[str, dict]:
    path = tmp_path / "r.json"
    code, out, _ = run_cli("paged", ["4", "--simulate", "llama3-8b", "--gpu-memory-gb", "24", "--json", str(path)],
                           capsys)
    assert code == 0
    return out, json.loads(path.read_text())


def test_simulate_measures_lengths_with_llama_models_tokenizer_where_installed(tmp_path, capsys, monkeypatch):
    """A stand-in `llama_models` package on the path, shipping a byte-level tokenizer.model where Meta's
    ships Llama 3's: --simulate finds it without importing the package and measures the prompts with it."""
    package = tmp_path / "site" / "llama_models"
    (package / "llama3").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the planner must not import the package')\n")
    (package / "llama3" / "tokenizer.model").write_bytes(tokenizer_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert installed_llama3_tokenizer() == package / "llama3" / "tokenizer.model"
    out, doc = simulate_4(tmp_path, capsys)
    assert "lengths measured with Llama 3's tokenizer (from llama-models)" in out
    byte_level = simulated_timeline(load_tokenizer(package / "llama3" / "tokenizer.model"), doc["kv_budget_bytes"])
    assert doc["timeline"] == byte_level != simulated_timeline(demo_tokenizer(), doc["kv_budget_bytes"])


def test_simulate_says_the_demo_tokenizer_stands_in_without_llama_models(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_models", None)  # as if not installed
    assert installed_llama3_tokenizer() is None
    out, doc = simulate_4(tmp_path, capsys)
    assert "the demo tokenizer, a stand-in for Llama 3's (`pip install llama-models==0.3.0`" in out
    assert doc["timeline"] == simulated_timeline(demo_tokenizer(), doc["kv_budget_bytes"])


def test_cli_simulate_from_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                               "intermediate_size": 8192, "num_attention_heads": 32, "num_hidden_layers": 16,
                               "num_key_value_heads": 8, "vocab_size": 128256}))
    code, out, _ = run_cli("paged", ["2", "--simulate", str(cfg), "--gpu-memory-gb", "8"], capsys)
    assert code == 0 and "1.50B parameters" in out


@pytest.mark.parametrize("argv,pattern", [
    (["2", "--simulate", "llama9-1t", "--gpu-memory-gb", "24"], "llama3-8b, llama3-70b"),
    (["2", "--simulate", "llama3-8b"], "--gpu-memory-gb"),
    (["2", "--simulate", "llama3-70b", "--gpu-memory-gb", "24"], "no memory left"),
    (["2", "--kv-cache-gb", "-1"], "not a usable budget"),
    (["2", "--kv-cache-gb", "1e9"], "not a usable budget"),
    (["2", "--kv-cache-gb", "0.00001", "--no-progress"], "too small"),
    (["2", "--gpu-memory-gb", "24"], "only applies with --simulate"),
    (["2", "--simulate", "llama3-70b", "--gpu-memory-gb", "80", "--tensor-parallel-size", "0"], "positive integer"),
    (["2", "--simulate", "llama3-70b", "--gpu-memory-gb", "80", "--tensor-parallel-size", "-4"], "positive integer"),
    (["2", "--simulate", "llama3-70b", "--gpu-memory-gb", "80", "--tensor-parallel-size", "3"],
     "does not divide the model's 8 KV heads; use one of 1, 2, 4, 8"),
    (["2", "--simulate", "llama3-70b", "--gpu-memory-gb", "24", "--tensor-parallel-size", "2"],
     "no memory left for the KV cache on each GPU"),
    (["2", "--tensor-parallel-size", "3"], "does not divide the model's 2 KV heads; use one of 1, 2"),
    (["2", "--tensor-parallel-size", "2", "--dist-timeout", "0"], "--dist-timeout 0.0 must be a positive"),
])
def test_cli_budget_errors(argv, pattern, capsys):
    code, _, err = run_cli("naive", argv, capsys)
    assert code in (1, 2)
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert re.search(re.escape(pattern), err)


def test_demo_requests_generate_exactly_their_reference_lengths(tmp_path, capsys):
    """The demo ignores stop tokens, so each request generates its dataset answer's length and memory
    follows the traffic the dataset describes. Its random weights do emit them by chance: the 11th
    request's greedy answer holds `<|end_of_text|>` at token 432 of the 806 it asks for (its dataset
    answer's length in the demo tokenizer, counted here without the package)."""
    path = tmp_path / "r.json"
    code, _, _ = run_cli("paged", ["11", "--no-progress", "--no-answers", "--json", str(path)], capsys)
    assert code == 0
    answers = json.loads(path.read_text())["requests"]
    assert len(answers) == 11 and {a["finish_reason"] for a in answers} == {"length"}
    lengths = derived.shipped_lengths(derived.DEMO_MAX_SEQ_LEN)
    assert [a["output_tokens"] for a in answers] == [n for _, n in lengths[:11]]
    assert answers[10]["output_tokens"] == lengths[10][1] == 806

"""Before/after of the model's RoPE and RMSNorm, of the greedy pick and of the torch backend's
decode attention, alternated in one process.

This machine's speed drifts by tens of percent over minutes (other tenants of its cores), more
than these changes move a whole step, so the versions are never measured minutes apart:
- op by op, in interleaved rounds of calls on the demo's and the 100M preset's shapes;
- as whole decode steps of the paged twin, the model's functions swapped every step
  (`bench/baselines.py` keeps the old ones), each version's median over its steps.

    python bench/model_ops.py [--quick]
"""
from __future__ import annotations

import itertools
import statistics
import sys
import time
from pathlib import Path
from types import MethodType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DTYPE, MODELS, Request, budget_for_rows, load_model, log, make_cache, save_json,  # noqa: E402
                    bench_parser, parse)
from baselines import PerHeadGqaTorchAttention, max_indices, rms_norm_by_hand, rope_real_halves  # noqa: E402

import pagedllama.model.model  # noqa: E402
import pagedllama.engine.sampling  # noqa: E402
from pagedllama.model.attention import TorchAttention, plan_decode_groups  # noqa: E402
from pagedllama.model.model import RMSNorm  # noqa: E402

VERSIONS = {"package": (pagedllama.model.model.apply_rope, RMSNorm.forward, pagedllama.engine.sampling.first_argmax,
                        TorchAttention._decode_sdpa),
            "before": (rope_real_halves, rms_norm_by_hand, max_indices, PerHeadGqaTorchAttention._decode_sdpa)}
ROUNDS = 9


def use(version: str) -> None:
    """Attention.forward and `sample` look `apply_rope` and `first_argmax` up in their modules at
    each call; RMSNorm and the decode attention go through their classes."""
    (pagedllama.model.model.apply_rope, RMSNorm.forward, pagedllama.engine.sampling.first_argmax,
     TorchAttention._decode_sdpa) = VERSIONS[version]


def decode_attention(args, batch: int, gen: torch.Generator):
    """A call of the torch backend's decode attention (K/V gather and SDPA), with a given
    `_decode_sdpa`, over `batch` contexts of 64-512 tokens in 16-slot blocks scattered through a pool."""
    lens = torch.randint(64, 513, (batch,), generator=gen).tolist()
    blocks = [-(-n // 16) for n in lens]
    order = torch.randperm(sum(blocks), generator=gen).int()
    tables = torch.zeros(batch, max(blocks), dtype=torch.int32)
    for i, (start, n) in enumerate(zip(itertools.accumulate([0] + blocks), blocks)):
        tables[i, :n] = order[start:start + n]
    k_cache, v_cache = (torch.randn(sum(blocks), 16, args.n_kv_heads, args.head_dim, generator=gen).to(DTYPE)
                        for _ in range(2))
    q = torch.randn(batch, args.n_heads, args.head_dim, generator=gen).to(DTYPE)
    groups, backend = plan_decode_groups(lens, tables), TorchAttention()

    def attend(decode_sdpa):
        backend._decode_sdpa = MethodType(decode_sdpa, backend)
        return [backend._attend_group(q if g.seqs is None else q[g.seqs], k_cache, v_cache, g, args.head_dim ** -0.5)
                for g in groups]
    return attend


def op_us(name: str, tokens: int, calls: int = 40) -> dict[str, dict[str, float]]:
    """Per-call CPU time of RoPE (on the query and the key heads), of one RMSNorm and of the greedy
    pick over `tokens` rows of logits, and of one layer's decode attention at batch `tokens`, per
    version."""
    model = load_model(name)
    args = model.args
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(tokens, args.n_heads, args.head_dim, generator=gen).to(DTYPE)
    k = torch.randn(tokens, args.n_kv_heads, args.head_dim, generator=gen).to(DTYPE)
    x = torch.randn(tokens, args.dim, generator=gen).to(DTYPE)
    logits = torch.randn(tokens, args.vocab_size, generator=gen)
    freqs_cis, norm = model.rope[:tokens], model.layers[0].attention_norm
    attend = decode_attention(args, tokens, gen)
    ops = {"rope (q and k)": lambda rope, _, __, ___: (rope(q, freqs_cis), rope(k, freqs_cis)),
           "rms_norm": lambda _, forward, __, ___: forward(norm, x),
           "greedy pick": lambda _, __, pick, ___: pick(logits),
           "decode attention (contexts 64-512)": lambda _, __, ___, decode_sdpa: attend(decode_sdpa)}
    out = {}
    for op, call in ops.items():
        times: dict[str, list[float]] = {v: [] for v in VERSIONS}
        for r in range(ROUNDS):
            for version in (VERSIONS if r % 2 == 0 else list(VERSIONS)[::-1]):
                fns = VERSIONS[version]
                call(*fns)  # warm
                t0 = time.process_time()
                for _ in range(calls):
                    call(*fns)
                times[version].append(1e6 * (time.process_time() - t0) / calls)
        out[op] = {v: statistics.median(t) for v, t in times.items()}
    return out


def step_ms(name: str, batch: int, prompt: int = 128) -> dict[str, float]:
    """Median decode step of the paged twin per version, the version swapped every step."""
    model = load_model(name)
    warm = 2
    reqs = [Request(f"r{i}", [(7 * i + j) % 4000 + 1 for j in range(prompt + i % 16)], warm + 2 * ROUNDS + 1)
            for i in range(batch)]
    cache = make_cache("paged", name, reqs, budget_for_rows(name, batch))
    engine = cache.engine(model, reqs, max_prefill_tokens=1 << 20)
    times: dict[str, list[float]] = {v: [] for v in VERSIONS}
    decode_steps = [0]
    step = engine.step

    def step_():
        i = decode_steps[0] - warm
        version = list(VERSIONS)[(i + i // 2) % 2]  # ABBA ...: neither version always goes first
        use(version)
        t0 = time.process_time()
        out = step()
        dt = time.process_time() - t0
        if engine.scheduler.running and all(s.num_output_tokens > 1 for s in engine.scheduler.running):
            decode_steps[0] += 1
            if i >= 0:
                times[version].append(1e3 * dt)
        return out

    engine.step = step_
    try:
        engine.run(reqs, progress=False)
    finally:
        use("package")
    return {v: statistics.median(t) for v, t in times.items()}


def run(quick: bool) -> dict:
    op_tokens = (1, 32, 256)
    step_batches = {"demo": (32, 256), "100m": (28,) if quick else (28, 97)}
    doc: dict = {"quick": quick, "ops": [], "steps": []}
    for name in MODELS:
        for t in op_tokens:
            for op, by in op_us(name, t).items():
                doc["ops"].append({"model": name, "tokens": t, "op": op, **by})
                log(f"  {name} {op} x{t}: package {by['package']:.1f} us, before {by['before']:.1f} us")
        for b in step_batches[name]:
            by = step_ms(name, b)
            doc["steps"].append({"model": name, "batch": b, **by})
            log(f"  {name} decode step at batch {b}: package {by['package']:.2f} ms, before {by['before']:.2f} ms")
    save_json("model_ops" + ("_quick" if quick else ""), doc)
    return doc


def main() -> None:
    run(parse(bench_parser(__doc__)).quick)


if __name__ == "__main__":
    main()

"""pagedllama (paged twin) against Hugging Face transformers on the same weights and prompts.

The random weights are written with `save_hf` (tests/checkpoint_writers.py) and read back with
`LlamaForCausalLM.from_pretrained` (SDPA attention; the benchmarks' dtype, see common.DTYPE).
Greedy decoding, EOS ignored, each request generating exactly its own number of tokens. Three
engines, interleaved and repeated:

- pagedllama's paged twin: continuous batching, every request generates its own length.
- HF `generate()`: one static batch, prompts left-padded to the longest, `max_new_tokens` = the
  longest answer of the batch (a static batch cannot stop one row early). Only each request's
  own tokens count as output: the rest is the work static batching wastes.
- HF `generate_batch()` machinery (continuous batching over a paged cache, transformers >= 4.56):
  driven through `continuous_batching_context_manager` so that each request gets its own
  `max_new_tokens`; page size 256 (its default), pool sized to hold the whole batch.

Token agreement: each engine's tokens are compared with pagedllama's; a request "matches" when all
its tokens are equal. Random weights make near-ties in the logits common, so rounding differences
(different matmul shapes, RoPE layouts) can flip a token, and in bfloat16 they often do; the first
divergence position is reported. When the timed runs are not in float32, every engine also runs
once in float32 first, untimed, and that is the token check: same weights, same prompts, same
tokens, so the timed runs do the same work.

    python bench/hf_compare.py [--quick] [--repeats N]
"""
from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent / "tests")]

from common import (DEVICE, DTYPE, MODELS, Clock, RandomSpec, budget_for_rows, describe_model,  # noqa: E402
                    load_model, log, make_cache, median, paired, random_requests, ratios, run_engine, save_json,
                    sharegpt_requests, bench_parser, parse, print_summary, state_dict, workload_stats)

from checkpoint_writers import save_hf  # noqa: E402  (tests/: the package only reads checkpoints)

PAD_ID = 0  # any id: padded positions are masked out


def hf_available() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


_HF: dict[tuple[str, torch.dtype], object] = {}


def hf_model(name: str, dtype: torch.dtype = DTYPE):
    if (name, dtype) not in _HF:
        from transformers import LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory() as d:
            save_hf(state_dict(name), MODELS[name], d)
            m = LlamaForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa")
        _HF[name, dtype] = m.to(DEVICE).eval()
    return _HF[name, dtype]


def hf_generate(model, reqs) -> tuple[Clock, list[list[int]]]:
    """One static batch, left padding; returns (its clock, each request's own tokens)."""
    from transformers import GenerationConfig

    width = max(len(r.prompt_ids) for r in reqs)
    ids = torch.tensor([[PAD_ID] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs], device=DEVICE)
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs], device=DEVICE)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in reqs),
                           eos_token_id=None, pad_token_id=PAD_ID)
    with Clock() as c, torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    return c, [out[i, width:width + r.max_new_tokens].tolist() for i, r in enumerate(reqs)]


def hf_generate_batch(model, reqs) -> tuple[Clock, list[list[int]]]:
    """transformers' continuous batching (paged cache), each request with its own max_new_tokens."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 256
    blocks = sum(-(-(len(r.prompt_ids) + r.max_new_tokens) // page) for r in reqs) + len(reqs)
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=4096,
                                  allow_block_sharing=False)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in reqs),
                           eos_token_id=-1, pad_token_id=PAD_ID)
    results = {}
    with Clock() as c, model.continuous_batching_context_manager(generation_config=cfg, continuous_batching_config=cb,
                                                   block=True, timeout=30, warmup=False) as manager:
        for r in reqs:
            manager.add_request(r.prompt_ids, request_id=r.request_id, max_new_tokens=r.max_new_tokens,
                                eos_token_id=-1)
        while len(results) < len(reqs):
            res = manager.get_result(timeout=1)
            if res is not None and res.is_finished():
                results[res.request_id] = res
            elif res is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped")
    return c, [list(results[r.request_id].generated_tokens)[:r.max_new_tokens] for r in reqs]


def agreement(ref: list[list[int]], other: list[list[int]]) -> dict:
    first = []
    for a, b in zip(ref, other):
        div = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if div is None and len(a) != len(b):
            div = min(len(a), len(b))
        first.append(div)
    same = sum(d is None for d in first)
    total = sum(len(a) for a in ref)
    agree = sum(len(a) if d is None else d for a, d in zip(ref, first))
    return {"requests_identical": same, "requests": len(ref), "first_divergence": first,
            "tokens_before_first_divergence_pct": 100 * agree / total if total else 100.0}


def float32_agreement(model_name: str, reqs, with_cb: bool) -> dict:
    """Each engine once in float32, untimed: the token check for runs timed in another dtype."""
    f32 = torch.float32
    ours = run_engine(load_model(model_name, f32), make_cache("paged", model_name, reqs,
                                                                budget_for_rows(model_name, len(reqs)), dtype=f32),
                      reqs).outputs
    hf = hf_model(model_name, f32)
    doc = {"agreement_generate": agreement(ours, hf_generate(hf, reqs)[1])}
    if with_cb:
        doc["agreement_generate_batch"] = agreement(ours, hf_generate_batch(hf, reqs)[1])
    return doc


def compare(model_name: str, reqs, label: str, repeats: int, with_cb: bool) -> dict:
    ours_model = load_model(model_name)
    hf = hf_model(model_name)
    budget = budget_for_rows(model_name, len(reqs))
    useful = sum(r.max_new_tokens for r in reqs)
    log(f"  HF compare: {model_name}, {label}: {len(reqs)} requests, {useful} output tokens")
    outs: dict[str, list[list[int]]] = {}

    def ours():
        r = run_engine(ours_model, make_cache("paged", model_name, reqs, budget), reqs)
        outs["pagedllama"] = r.outputs
        return r.rates()

    def gen():
        c, o = hf_generate(hf, reqs)
        outs["hf_generate"] = o
        return {"cpu": useful / c.cpu, "wall": useful / c.wall}

    def gen_batch():
        c, o = hf_generate_batch(hf, reqs)
        outs["hf_generate_batch"] = o
        return {"cpu": useful / c.cpu, "wall": useful / c.wall}

    fns = {"pagedllama": ours, "hf_generate": gen}
    if with_cb:
        fns["hf_generate_batch"] = gen_batch
    tps = paired(fns, repeats, log)
    doc = {"model": model_name, "workload": label, "workload_stats": workload_stats(reqs), "tok_per_s": tps,
           "padded_prompt_width": max(len(r.prompt_ids) for r in reqs),
           "static_batch_tokens_generated": len(reqs) * max(r.max_new_tokens for r in reqs),
           "useful_output_tokens": useful,
           "vs_generate": ratios(tps, "pagedllama", "hf_generate"),
           "agreement_generate": agreement(outs["pagedllama"], outs["hf_generate"]),
           "target_vs_generate": 2.0, "repeats": repeats}
    if with_cb:
        doc["vs_generate_batch"] = ratios(tps, "pagedllama", "hf_generate_batch")
        doc["agreement_generate_batch"] = agreement(outs["pagedllama"], outs["hf_generate_batch"])
        doc["target_vs_generate_batch"] = 4.0
    if DTYPE != torch.float32:
        doc["float32"] = float32_agreement(model_name, reqs, with_cb)
    return doc


def plan(quick: bool) -> list:
    if quick:
        return [("demo", sharegpt_requests(12, cap=48), "ShareGPT first 12, answers capped at 48")]
    r32 = RandomSpec(32, 25, 256, 25, 256)
    return [("demo", sharegpt_requests(32, cap=256), "ShareGPT first 32, answers capped at 256"),
            ("demo", random_requests(r32), r32.label()),
            ("100m", sharegpt_requests(16, cap=32), "ShareGPT first 16, answers capped at 32")]

def run(quick: bool, repeats: int = 3) -> dict:
    version = hf_available()
    if version is None:
        log("  transformers is not installed: pip install -r requirements-bench.txt; HF comparison skipped")
        return {"skipped": "transformers not installed"}
    from transformers import PreTrainedModel

    with_cb = hasattr(PreTrainedModel, "generate_batch") or hasattr(
        __import__("transformers").LlamaForCausalLM, "generate_batch")
    doc = {"quick": quick, "transformers": version, "generate_batch_available": with_cb,
           "models": {m: describe_model(m) for m in ("demo", "100m")}, "cases": []}
    for model, reqs, label in plan(quick):
        doc["cases"].append(compare(model, reqs, label, repeats, with_cb))
    save_json("hf_compare" + ("_quick" if quick else ""), doc)
    plot(doc)
    return doc


def plot(doc: dict) -> None:
    from common import pyplot, save_plot

    plt = pyplot()
    cases = doc["cases"]
    fig, ax = plt.subplots(figsize=(max(6, 2.4 * len(cases)), 4))
    engines = ["pagedllama", "hf_generate"] + (["hf_generate_batch"] if doc["generate_batch_available"] else [])
    width = 0.8 / len(engines)
    for j, e in enumerate(engines):
        vals = [median(c["tok_per_s"][e]["cpu"]) for c in cases]
        xs = [i + (j - (len(engines) - 1) / 2) * width for i in range(len(cases))]
        ax.bar(xs, vals, width, label=e)
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(cases)), [f"{c['model']}\n{c['workload'].split(',')[0]}" for c in cases], fontsize=8)
    ax.set_ylabel("useful output tokens per CPU-second (median)")
    ax.set_title(f"pagedllama vs transformers {doc['transformers']} ({DEVICE.type}, "
                 f"{str(DTYPE).removeprefix('torch.')}, greedy)", fontsize=9)
    ax.legend(fontsize=8)
    save_plot(fig, "hf_compare" + ("_quick" if doc["quick"] else ""))


def summary_rows(doc: dict) -> list[tuple]:
    rows = []
    for c in doc.get("cases", []):
        name = f"{c['model']}, {c['workload'].split(',')[0]}"
        check = c.get("float32", c)  # the token check: float32 when the timed runs are not
        where = " in float32" if "float32" in c else ""
        ag = check["agreement_generate"]
        r = c["vs_generate"]
        rows.append((f"pagedllama / HF generate() ({name}; {ag['requests_identical']}/{ag['requests']} "
                     f"requests token-identical{where})", r["median"], ">= 2", r["median"] >= 2, r["wall"]["median"]))
        if "vs_generate_batch" in c:
            ag = check["agreement_generate_batch"]
            r = c["vs_generate_batch"]
            rows.append((f"pagedllama / HF generate_batch() ({name}; {ag['requests_identical']}/{ag['requests']} "
                         f"identical{where})", r["median"], ">= 4", r["median"] >= 4, r["wall"]["median"]))
    return rows


def main() -> None:
    a = parse(bench_parser(__doc__, repeats=True))
    print_summary(summary_rows(run(a.quick, a.repeats)))


if __name__ == "__main__":
    main()

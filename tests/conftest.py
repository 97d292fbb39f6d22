"""Shared fixtures: a tiny Llama 3 shaped model with random weights, and ways to run it."""
from __future__ import annotations

import base64
import signal
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import Phase, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint_writers import meta_params, save_hf, save_meta  # noqa: E402
from full_forward import full_forward  # noqa: E402
from llama_reference import reference_logits  # noqa: E402
from pagedllama.app import dtype_choice  # noqa: E402
from pagedllama.engine.config import CacheLayout, EngineConfig  # noqa: E402
from pagedllama.engine.engine import Engine, RunResult  # noqa: E402
from pagedllama.engine.scheduler import Scheduler  # noqa: E402
from pagedllama.engine.sequence import Request, Sequence, SequenceGroup  # noqa: E402
from pagedllama.io.checkpoint import build_model, random_state_dict  # noqa: E402
from pagedllama.model.attention import AttentionBackend, TorchAttention  # noqa: E402
from pagedllama.model.config import ModelArgs, RopeScaling  # noqa: E402
from pagedllama.model.model import Transformer  # noqa: E402

# tools/mutation.py runs the tests once per mutant (`--hypothesis-profile mutation`): the same
# examples every run, so scores repeat, and a failure is not shrunk (a failure is all it needs).
settings.register_profile("mutation", derandomize=True, database=None, deadline=None,
                          phases=[Phase.explicit, Phase.generate])

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=160)
# A model whose vocabulary is the byte-level tokenizer's (256 bytes + 256 specials): checkpoints on disk.
BYTE_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=192)
CPU = torch.device("cpu")

# Shapes at which the float64 reference (llama_reference.py) checks the model: no RoPE scaling,
# Llama 3.1's factor 8 and 3.2's factor 32; tied and untied output; GQA ratios 1, 4 and 8; head
# dims 64 and 128. Tiny otherwise: 2 layers, FFN 192, a vocabulary of 256.
_SMALL = dict(n_layers=2, vocab_size=256, hidden_dim=192)
REFERENCE_SHAPES = {
    "mha-hd128": ModelArgs(dim=256, n_heads=2, n_kv_heads=2, **_SMALL),
    "3.1-gqa8-hd64": ModelArgs(dim=512, n_heads=8, n_kv_heads=1, rope_scaling=RopeScaling(factor=8.0), **_SMALL),
    "3.2-gqa4-hd128-tied": ModelArgs(dim=512, n_heads=4, n_kv_heads=1, rope_scaling=RopeScaling(factor=32.0),
                                     tie_word_embeddings=True, **_SMALL),
    "gqa4-hd64-tied-theta1e4": ModelArgs(dim=256, n_heads=4, n_kv_heads=1, rope_theta=10000.0,
                                         tie_word_embeddings=True, **_SMALL),
}


def default_sigint() -> None:
    """`preexec_fn` for a child a test interrupts with SIGINT: a shell starts background jobs with
    SIGINT ignored, a child inherits that, and Python then installs no Ctrl-C handler at all, so
    the test would pass in a terminal and fail when the suite runs in the background."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session", autouse=True)
def cpu_without_amx():
    """`--dtype auto` on CPU picks float32 here as on this project's machine, whatever the CPU: the tests
    that run the CLI expect float32 runs, and a CPU with AMX would time its way to bfloat16 at some
    batches. test_dtype_choice.py patches it back per test to cover the AMX path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dtype_choice, "has_amx_bf16", lambda: False)
        yield


@pytest.fixture(scope="session")
def tiny_model() -> Transformer:
    return build_model(TINY, random_state_dict(TINY, seed=1), CPU, torch.float32, max_positions=1024)


def make_engine(model: Transformer | None, block_size: int, num_blocks: int, max_seq_len: int, max_num_seqs: int,
                backend: AttentionBackend | None = None, dtype: torch.dtype = torch.float32, **options) -> Engine:
    """An engine over a pool of `num_blocks` blocks of `block_size` slots with `max_num_seqs` block-table
    rows (the torch backend by default; no model: a dry run of TINY's shape), generating greedily to
    each request's length unless `options` (EngineConfig's fields) say otherwise. Blocks of
    `max_seq_len` slots are the naive twin's preallocated rows (`budget.cache_layout`'s `--reserve max`),
    which decode reads in place."""
    config = EngineConfig("paged", model.args if model is not None else TINY, max_seq_len, dtype, CPU, block_size,
                          **{"ignore_eos": True, **options})
    if model is not None:
        backend = backend or TorchAttention()
    layout = CacheLayout(block_size, num_blocks, preallocated=block_size == max_seq_len)
    return Engine(config, layout, max_num_seqs, model, backend)


def generate(engine: Engine, requests: list[Request]) -> tuple[list[list[int]], Engine]:
    result = engine.run(requests, progress=False)
    return [s.output_ids for s in result.sequences], engine


def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation, no cache: the ground truth."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(full_forward(model, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def lively_state_dict(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with which every part of a layer moves the logits: matrices of std
    1.5/sqrt(fan-in) (attention neither flat nor one-hot), an embedding of std 1, and norm weights
    that are not all ones (the demo's are), so scaling by them is checked too."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in random_state_dict(args, seed).items():
        if name == "output.weight" and args.tie_word_embeddings:
            sd[name] = sd["tok_embeddings.weight"]  # one tensor, as the loader ties them
        elif t.dim() == 1:
            sd[name] = 1 + 0.5 * torch.randn(t.shape, generator=g)
        else:
            std = 1.0 if name == "tok_embeddings.weight" else 1.5 / t.shape[1] ** 0.5
            sd[name] = std * torch.randn(t.shape, generator=g)
    return sd


def hf_config(args: ModelArgs, style: str) -> dict:
    """The config.json of a LlamaForCausalLM of shape `args`, as transformers 4 ("transformers-4":
    `rope_theta`, `rope_scaling`) or transformers 5 ("transformers-5": `rope_parameters`) writes it."""
    rs = args.rope_scaling
    scaling = None if rs is None else {
        "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
        "high_freq_factor": rs.high_freq_factor,
        "original_max_position_embeddings": rs.original_max_position_embeddings}
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_attention_heads": args.n_heads,
           "num_hidden_layers": args.n_layers, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
           "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
           "tie_word_embeddings": args.tie_word_embeddings,
           "max_position_embeddings": 131072 if rs else 8192, "torch_dtype": "float32"}
    if style == "transformers-4":
        return cfg | {"rope_theta": args.rope_theta, "rope_scaling": scaling}
    assert style == "transformers-5", style
    return cfg | {"rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta} if rs is None
                  else {**scaling, "rope_theta": args.rope_theta}}


def run_against_reference(engine: Engine, requests: list[Request], sd: dict[str, torch.Tensor],
                          tolerance: float = 1e-4) -> RunResult:
    """Run `requests`, checking every token the engine picks against the float64 reference
    (llama_reference.py) on weights `sd`: the logits it picks from (after a prefill, a decode step
    reading K/V through the block tables, a recompute or a swap) are the reference's for the same
    tokens, within `tolerance` of their largest magnitude, and a greedy pick is the reference's
    best token up to that tolerance (so near ties may go either way)."""
    rows = []  # (sequence, index of the token being picked, the logits it is picked from)
    next_tokens = engine._next_tokens

    def record(batch, logits, positions):
        rows.extend(zip(batch, positions.tolist(), logits.double()))
        return next_tokens(batch, logits, positions)

    engine._next_tokens = record
    result = engine.run(requests, progress=False)
    cfg = hf_config(engine.runner.model.args, "transformers-4")
    want = {s: reference_logits(sd, cfg, s.token_ids) for s in result.sequences}
    assert len(rows) == sum(s.num_output_tokens for s in result.sequences)  # one row per token picked
    for seq, index, logits in rows:  # logits at the token before `index` choose token `index`
        ref = want[seq][index - 1]
        atol = tolerance * ref.abs().max().item()
        torch.testing.assert_close(logits, ref, atol=atol, rtol=0)
        if engine.sampling.greedy:
            assert ref[seq.token_ids[index]] >= ref.max() - 2 * atol
    return result


def tokenizer_bytes() -> bytes:
    """A byte-level tiktoken `tokenizer.model`: the 256 single bytes and no merges (512 tokens with specials)."""
    return b"\n".join(base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)) + b"\n"


def write_byte_checkpoint(dest: Path, fmt: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint of BYTE_ARGS in Meta's ("meta") or Hugging Face's ("hf") format in `dest`, with
    the byte-level `tokenizer.model` beside it; returns its state dict."""
    sd = random_state_dict(BYTE_ARGS, seed)
    if fmt == "meta":
        save_meta(sd, meta_params(BYTE_ARGS, multiple_of=32, ffn_dim_multiplier=None), dest)
    else:
        save_hf(sd, BYTE_ARGS, dest)
    (dest / "tokenizer.model").write_bytes(tokenizer_bytes())
    return sd


def chats(*pairs: tuple[str, str]) -> list[dict]:
    """ShareGPT entries of one question and its answer each."""
    return [{"id": f"c{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for i, (q, a) in enumerate(pairs)]


def random_requests(lengths: list[tuple[int, int]], vocab: int, seed: int = 0) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    return [Request(f"r{i}", torch.randint(0, vocab, (p,), generator=g).tolist(), n)
            for i, (p, n) in enumerate(lengths)]


def new_group(scheduler: Scheduler, num_tokens: int, max_new_tokens: int) -> SequenceGroup:
    """Queue a one-sequence request of `num_tokens` prompt tokens."""
    seq = Sequence(next(scheduler.seq_ids), f"r{scheduler.stats.num_requests}", list(range(num_tokens)),
                   num_tokens, max_new_tokens)
    seq.group = SequenceGroup(seq.request_id, [seq])
    scheduler.add(seq.group)
    return seq.group


def dry_step(scheduler: Scheduler) -> tuple[list[Sequence], bool]:
    """What a dry-run engine step does: schedule, count as cached, append a token, retire."""
    batch, is_prefill = scheduler.schedule()
    scheduler.block_manager.commit(batch, is_prefill)
    for seq in batch:
        seq.token_ids.append(0)
        if seq.num_output_tokens == seq.max_new_tokens:
            scheduler.finish(seq, "length")
    return batch, is_prefill

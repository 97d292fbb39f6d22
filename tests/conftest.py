"""Shared fixtures: a tiny Llama 3 shaped model with random weights, and ways to run it."""
from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagedllama.attention import AttentionBackend, TorchAttention  # noqa: E402
from pagedllama.checkpoint import build_model, meta_params, random_state_dict, save_hf, save_meta  # noqa: E402
from pagedllama.config import ModelArgs  # noqa: E402
from pagedllama.engine import Engine, Request  # noqa: E402
from pagedllama.kv_cache import KVCache  # noqa: E402
from pagedllama.model import Transformer  # noqa: E402
from pagedllama.sampling import SamplingParams  # noqa: E402
from pagedllama.scheduler import Scheduler  # noqa: E402
from pagedllama.sequence import Sequence, SequenceGroup  # noqa: E402

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=160)
# A model whose vocabulary is the byte-level tokenizer's (256 bytes + 256 specials): checkpoints on disk.
BYTE_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=192)
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def tiny_model() -> Transformer:
    return build_model(TINY, random_state_dict(TINY, seed=1), CPU, torch.float32, max_positions=1024)


def make_cache(model: Transformer, block_size: int, num_blocks: int, max_seq_len: int, max_num_seqs: int,
               backend: AttentionBackend | None = None, dtype: torch.dtype = torch.float32) -> KVCache:
    return KVCache(model.args, num_blocks, block_size, max_seq_len, max_num_seqs,
                   backend or TorchAttention(), CPU, dtype)


def generate(model: Transformer, cache: KVCache, requests: list[Request],
             sampling: SamplingParams = SamplingParams()) -> tuple[list[list[int]], Engine]:
    engine = Engine(model, cache, sampling, frozenset(), ignore_eos=True)
    result = engine.run(requests, progress=False)
    return [s.output_ids for s in result.sequences], engine


def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation, no cache: the ground truth."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model.forward_full(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


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
    scheduler.cache.commit(batch, is_prefill)
    for seq in batch:
        seq.token_ids.append(0)
        if seq.num_output_tokens == seq.max_new_tokens:
            scheduler.finish(seq, "length")
    return batch, is_prefill

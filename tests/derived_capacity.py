"""Capacity and fragmentation figures derived from first principles, sharing no code with the package.

The tests compare the package's capacity planning (`dry_run`, `find_max_batch`, `compare`, the CLI)
and the README's headline figures with what these few lines compute from the shipped dataset's
lengths, the block size and the budget arithmetic. Only the raw files are shared: the dataset
(read with `json`) and the demo tokenizer's `tokenizer.model` (read line by line and handed to
tiktoken, the BPE library the package also uses, with Llama 3's published pre-tokenizer regex).
"""
from __future__ import annotations

import base64
import functools
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tiktoken

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "sharegpt-filtered.json"
DEMO_TOKENIZER_FILE = ROOT / "pagedllama" / "io" / "demo" / "tokenizer.model"
GIB = 2**30

# Llama 3's pre-tokenizer regex, as published with Meta's tokenizer.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# The scheduler's rules, restated: a prefill step takes at most this many prompt tokens; admission
# keeps 1% of the pool's blocks free while anything runs (not for the naive twin, whose rows never grow).
MAX_PREFILL_TOKENS = 4096
WATERMARK = 0.01

# Published shapes: (layers, KV heads, head dim, parameters, dim, FFN hidden dim).
LLAMA3_8B = dict(layers=32, kv_heads=8, head_dim=128, params=8_030_261_248, dim=4096, hidden=14336)
DEMO = dict(layers=4, kv_heads=2, head_dim=256 // 4)  # pagedllama's demo: dim 256, 4 heads, 2 KV heads
SMOLLM2_135M = dict(layers=30, kv_heads=3, head_dim=576 // 9)  # dim 576, 9 heads, 8192-token context
DEMO_MAX_SEQ_LEN = 4096
LLAMA3_MAX_SEQ_LEN = 8192


def kv_bytes_per_token(shape: dict, dtype_bytes: int) -> int:
    """K and V, for every layer and KV head: 2 x layers x kv_heads x head_dim x dtype bytes."""
    return 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * dtype_bytes


def llama3_8b_kv_budget(gpu_gb: float = 24, utilization: float = 0.9) -> int:
    """vLLM's rule on a GPU that is not here: usable memory minus bf16 weights minus one 4096-token
    prefill step's activations (residual and norms 2 x dim, q/k/v/o 2 x dim, SwiGLU 3 x hidden)."""
    s = LLAMA3_8B
    usable = int(gpu_gb * GIB * utilization)
    weights = s["params"] * 2
    activations = MAX_PREFILL_TOKENS * (4 * s["dim"] + 3 * s["hidden"]) * 2
    return usable - weights - activations


def cpu_default_budget(shape: dict, max_seq_len: int) -> int:
    """The CPU default: as many max_seq_len-token float32 rows as Llama 3 8B has 8192-token bf16 rows
    on a 24 GB GPU (a fraction, not rounded down)."""
    rows = llama3_8b_kv_budget() / (LLAMA3_MAX_SEQ_LEN * kv_bytes_per_token(LLAMA3_8B, 2))
    return int(rows * max_seq_len * kv_bytes_per_token(shape, 4))


def demo_cpu_budget() -> int:
    return cpu_default_budget(DEMO, DEMO_MAX_SEQ_LEN)


def demo_encoding() -> tiktoken.Encoding:
    """The demo tokenizer straight from its file: one `base64 rank` line per token."""
    ranks = {}
    for line in DEMO_TOKENIZER_FILE.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("demo-derived", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})


def shipped_conversations() -> list[tuple[str, str]]:
    """(prompt, answer) of each usable entry, in file order: the first human turn (unusable if there is
    none or it is blank) and the first assistant turn after it ("" if none)."""
    out = []
    for entry in json.loads(DATASET.read_text(encoding="utf-8")):
        turns = [(t["from"].strip().lower(), t["value"]) for t in entry["conversations"]]
        human = next((i for i, (role, _) in enumerate(turns) if role in ("human", "user")), None)
        if human is None or not turns[human][1].strip():
            continue
        answer = next((v for role, v in turns[human + 1:] if role in ("gpt", "chatgpt", "assistant", "bard")), "")
        out.append((turns[human][1], answer))
    return out


@functools.cache
def shipped_lengths(max_seq_len: int) -> list[tuple[int, int]]:
    """(prompt tokens, tokens to generate) per usable conversation, as the demo asks for them.

    Prompt: Llama 3's chat format, one special token each for begin_of_text, start/end header and
    eot, around the encoded "user" / "assistant" role names and "\\n\\n"; the stripped prompt text in
    between. Answer: the dataset answer's token count (at least 1), capped by the room left.
    """
    enc = demo_encoding()

    def n(text: str) -> int:
        return len(enc.encode_ordinary(text))

    return request_lengths(shipped_conversations(), n, max_seq_len)


def request_lengths(conversations: list[tuple[str, str]], n: Callable[[str], int],
                    max_seq_len: int) -> list[tuple[int, int]]:
    """(prompt tokens, tokens to generate) of each (prompt, answer), `n` counting a text's tokens."""

    def header(role: str) -> int:  # <|start_header_id|> role <|end_header_id|> "\n\n"
        return 1 + n(role) + 1 + n("\n\n")

    lengths = []
    for prompt, answer in conversations:
        p = 1 + header("user") + n(prompt.strip()) + 1 + header("assistant")  # <|begin_of_text|> ... <|eot_id|>
        lengths.append((p, min(max(1, n(answer)), max_seq_len - p)))
    return lengths


@dataclass
class Step:
    reserved_tokens: int  # slots in blocks some request owns
    used_tokens: int  # slots holding a token's K/V
    running: int  # requests running


def simulate(lengths: list[tuple[int, int]], num_blocks: int, block_size: int,
             watermark_blocks: int) -> list[Step] | None:
    """Every step's memory until all requests finish, or None if memory ran short (a request had to
    wait for blocks, or decode found no block for a growing request).

    Rules: requests are admitted first come first served while the step's prompts stay within
    MAX_PREFILL_TOKENS and the pool keeps `watermark_blocks` free (none needed when nothing runs); an
    admitted request takes ceil(prompt / block_size) blocks. A step is either a prefill of the
    admitted requests (caching their prompts) or a decode of all running ones (each caching one more
    token, taking a new block when that token starts one). Each step yields a token per request; a
    request is done (its blocks freed, after the step is measured) when it has all its tokens.
    """
    waiting = deque(range(len(lengths)))
    running: list[int] = []
    blocks = [0] * len(lengths)
    cached = [0] * len(lengths)
    generated = [0] * len(lengths)
    free = num_blocks
    steps = []

    def blocks_for(tokens: int) -> int:
        return -(-tokens // block_size)

    while waiting or running:
        admitted, prompt_tokens = [], 0
        while waiting:
            r = waiting[0]
            p = lengths[r][0]
            if prompt_tokens and prompt_tokens + p > MAX_PREFILL_TOKENS:
                break  # waits for the next prefill step: not a lack of memory
            if free - blocks_for(p) < (watermark_blocks if running else 0):
                return None  # waits for memory
            waiting.popleft()
            free -= blocks_for(p)
            blocks[r], cached[r] = blocks_for(p), p
            running.append(r)
            admitted.append(r)
            prompt_tokens += p
        batch = admitted or list(running)
        if not admitted:  # decode: the token generated last step is cached now
            grow = [blocks_for(cached[r] + 1) - blocks[r] for r in batch]
            if sum(grow) > free:
                return None  # a request would be preempted
            for r, g in zip(batch, grow):
                blocks[r] += g
                cached[r] += 1
            free -= sum(grow)
        steps.append(Step((num_blocks - free) * block_size, sum(cached[r] for r in running), len(running)))
        for r in batch:
            generated[r] += 1
            if generated[r] == lengths[r][1]:
                running.remove(r)
                free += blocks[r]
    return steps


def paged_fits(lengths: list[tuple[int, int]], budget: int, bytes_per_token: int, block_size: int) -> bool:
    num_blocks = budget // (block_size * bytes_per_token)
    return simulate(lengths, num_blocks, block_size, int(WATERMARK * num_blocks)) is not None


def paged_max_batch(lengths: list[tuple[int, int]], budget: int, bytes_per_token: int, block_size: int) -> int:
    """The largest K whose first K requests fit: bisection (one more request never needs less memory)."""
    lo, hi = 0, len(lengths) + 1  # fits(lo); hi: past the last K tried
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if paged_fits(lengths[:mid], budget, bytes_per_token, block_size) else (lo, mid)
    return lo


def naive_max_batch(budget: int, bytes_per_token: int, max_seq_len: int) -> int:
    """The naive twin reserves a whole max_seq_len row per request up front: whole rows in the budget."""
    return budget // (max_seq_len * bytes_per_token)


@dataclass
class Peak:
    utilization: float  # holding / reserved at the step that reserved most (the first such step)
    fragmented_fraction_of_budget: float  # (reserved - holding) there, in bytes, over the budget


def peak(steps: list[Step], bytes_per_token: int, budget: int) -> Peak:
    top = max(steps, key=lambda s: s.reserved_tokens)  # max() keeps the first of equal ones
    return Peak(top.used_tokens / top.reserved_tokens,
                (top.reserved_tokens - top.used_tokens) * bytes_per_token / budget)


def naive_steps(lengths: list[tuple[int, int]], max_seq_len: int) -> list[Step]:
    """The naive twin: one block of max_seq_len slots per request, as many blocks as requests, no watermark."""
    steps = simulate(lengths, len(lengths), max_seq_len, 0)
    assert steps is not None  # every request has its row
    return steps


@dataclass(frozen=True)
class Headline:
    """The README's headline figures, derived: the demo at its CPU default budget, 6 requests, blocks
    of 16, and Llama 3 8B on a 24 GB GPU (8192-token context, bf16, the demo tokenizer's lengths)."""

    demo_budget: int
    naive: Peak
    paged: Peak
    naive_max_batch: int
    paged_max_batch: int
    naive_max_batch_8b: int
    paged_max_batch_8b: int


@functools.cache
def headline(batch: int = 6, block_size: int = 16) -> Headline:
    budget, slot = demo_cpu_budget(), kv_bytes_per_token(DEMO, 4)
    lengths = shipped_lengths(DEMO_MAX_SEQ_LEN)
    num_blocks = budget // (block_size * slot)
    paged_steps = simulate(lengths[:batch], num_blocks, block_size, int(WATERMARK * num_blocks))
    assert paged_steps is not None
    budget_8b, slot_8b = llama3_8b_kv_budget(), kv_bytes_per_token(LLAMA3_8B, 2)
    return Headline(budget, peak(naive_steps(lengths[:batch], DEMO_MAX_SEQ_LEN), slot, budget),
                    peak(paged_steps, slot, budget),
                    naive_max_batch(budget, slot, DEMO_MAX_SEQ_LEN), paged_max_batch(lengths, budget, slot, block_size),
                    naive_max_batch(budget_8b, slot_8b, LLAMA3_MAX_SEQ_LEN),
                    paged_max_batch(shipped_lengths(LLAMA3_MAX_SEQ_LEN), budget_8b, slot_8b, block_size))

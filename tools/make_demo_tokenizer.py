"""Train the demo tokenizer: byte-level BPE on `sharegpt-filtered.json`, written as `tokenizer.model`.

The demo model needs a real Llama 3-style tokenizer that is small enough to commit. This
trains one the way Llama 3's was shaped: text is pre-split with Llama 3's pattern, the 256
single bytes are ranks 0..255, and each merge of the most frequent adjacent pair adds the
next rank until there are 4096. Ties break on the pair's bytes, so reruns write the same file.

Run from the repo root after `tools/make_sharegpt_sample.py`: `python tools/make_demo_tokenizer.py`.
"""
from __future__ import annotations

import base64
import heapq
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import regex

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: use its pagedllama
from pagedllama.io.tokenizer import DEMO_TOKENIZER, PAT_STR  # noqa: E402

DATA = ROOT / "sharegpt-filtered.json"
NUM_BASE_RANKS = 4096

Pair = tuple[bytes, bytes]


def corpus_words(path: Path) -> Counter[bytes]:
    """How often each pre-split piece of every turn's text occurs."""
    pattern = regex.compile(PAT_STR)
    counts: Counter[bytes] = Counter()
    for entry in json.loads(path.read_text(encoding="utf-8")):
        for turn in entry["conversations"]:
            counts.update(piece.encode("utf-8") for piece in pattern.findall(turn["value"]))
    return counts


def train(word_counts: Counter[bytes], num_ranks: int) -> list[bytes]:
    """Tokens in rank order: the 256 bytes, then one per merge.

    Pair counts are updated only for the words a merge touches, and the most frequent pair
    comes from a heap whose stale entries are skipped when popped.
    """
    tokens = [bytes([b]) for b in range(256)]
    known = set(tokens)
    words = [[bytes([b]) for b in word] for word in word_counts]
    freqs = list(word_counts.values())
    pair_counts: Counter[Pair] = Counter()
    where: defaultdict[Pair, set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(tokens) < num_ranks and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale entry: the count changed since it was pushed
        merged = pair[0] + pair[1]
        if merged not in known:  # two different splits can spell the same bytes
            tokens.append(merged)
            known.add(merged)
        changed: set[Pair] = set()
        for i in where.pop(pair):
            word, freq = words[i], freqs[i]
            for old in zip(word, word[1:]):
                pair_counts[old] -= freq
                changed.add(old)
            words[i] = word = _merge(word, pair, merged)
            for new in zip(word, word[1:]):
                pair_counts[new] += freq
                where[new].add(i)
                changed.add(new)
        for p in changed:
            count = pair_counts[p]
            if count <= 0:
                pair_counts.pop(p, None)
            elif p != pair:
                heapq.heappush(heap, (-count, p))
        pair_counts.pop(pair, None)
    if len(tokens) < num_ranks:
        raise SystemExit(f"the corpus only supports {len(tokens)} ranks, fewer than {num_ranks}")
    return tokens


def _merge(word: list[bytes], pair: Pair, merged: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def main() -> None:
    tokens = train(corpus_words(DATA), NUM_BASE_RANKS)
    DEMO_TOKENIZER.parent.mkdir(parents=True, exist_ok=True)
    lines = (base64.b64encode(token) + b" " + str(rank).encode() for rank, token in enumerate(tokens))
    DEMO_TOKENIZER.write_bytes(b"\n".join(lines) + b"\n")
    print(f"wrote {len(tokens)} ranks (+256 special tokens) to {DEMO_TOKENIZER}")


if __name__ == "__main__":
    main()

"""Llama 3's tokenizer: byte-level BPE ranks run by tiktoken, plus the chat template.

Both on-disk forms are read into the same `{token bytes: rank}` table: Meta's
`tokenizer.model` (one `base64 rank` line per token) and Hugging Face's `tokenizer.json`
(the same tokens, spelled in GPT-2's printable stand-ins for bytes).
"""
from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import tiktoken

from .errors import UserError

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
}
DEMO_TOKENIZER = Path(__file__).parent / "demo" / "tokenizer.model"


def _special_token_names() -> list[str]:
    """Meta's order: reserved names number up through the slots the named tokens leave free."""
    names, reserved = [], 0
    for i in range(NUM_SPECIAL_TOKENS):
        if i in _NAMED_SPECIALS:
            names.append(_NAMED_SPECIALS[i])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


class Tokenizer:
    """Text <-> token ids for Llama 3, with special tokens numbered right after the base ranks."""

    def __init__(self, mergeable_ranks: dict[bytes, int]):
        num_base = len(mergeable_ranks)
        self.special_tokens: dict[str, int] = {
            name: num_base + i for i, name in enumerate(_special_token_names())
        }
        self.vocab_size = num_base + NUM_SPECIAL_TOKENS
        self._enc = tiktoken.Encoding(
            name=f"llama3-{num_base}",
            pat_str=PAT_STR,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.stop_ids: frozenset[int] = frozenset({self.eos_id, self.eot_id, self.eom_id})
        self._start_header = self.special_tokens["<|start_header_id|>"]
        self._end_header = self.special_tokens["<|end_header_id|>"]

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Encode `text` as plain text: `<|eot_id|>` typed by a user stays ordinary characters."""
        ids = self._enc.encode_ordinary(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        """Bytes that are not valid UTF-8 (a cut-off multi-byte character) decode as U+FFFD."""
        return self._enc.decode(ids, errors="replace")

    def _header(self, role: str) -> list[int]:
        return [self._start_header, *self.encode(role), self._end_header, *self.encode("\n\n")]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Llama 3 chat template over `{"role", "content"}` dicts, ending ready for the reply."""
        ids = [self.bos_id]
        for message in messages:
            ids += self._header(message["role"])
            ids += self.encode(message["content"].strip())
            ids.append(self.eot_id)
        return ids + self._header("assistant")

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Read a tiktoken-format `tokenizer.model`.

        Parsed here rather than with `tiktoken.load.load_tiktoken_bpe`, which caches local
        files by path under the temp dir and so would keep serving a file that was replaced.
        """
        path = Path(path)
        fix = "pass --tokenizer with Llama 3's tiktoken tokenizer.model (or its tokenizer.json)"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"tokenizer file {path} does not exist; {fix}") from None
        except OSError as e:
            raise UserError(f"cannot read tokenizer file {path} ({e.strerror}); {fix}") from None
        ranks: dict[bytes, int] = {}
        for line_no, line in enumerate(data.splitlines(), 1):
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise UserError(
                    f"{path} line {line_no} is not `base64 rank`: not a Llama 3 tiktoken "
                    f"tokenizer.model (Llama 1/2 use sentencepiece, which is not supported); {fix}"
                ) from None
        _check_ranks(ranks, path, fix)
        return cls(ranks)

    @classmethod
    def from_hf_json(cls, path: str | Path) -> Tokenizer:
        """Read a Hugging Face `tokenizer.json` of byte-level BPE (the Llama 3 one)."""
        path = Path(path)
        fix = "pass --tokenizer with Llama 3's tokenizer.json or original/tokenizer.model"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"tokenizer file {path} does not exist; {fix}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {path} as JSON ({e}); {fix}") from None
        model = doc.get("model") if isinstance(doc, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not isinstance(vocab, dict) or model.get("type") != "BPE":
            raise UserError(f"{path} has no byte-level BPE model.vocab; {fix}")
        added = [t.get("id") for t in doc.get("added_tokens") or [] if isinstance(t, dict)]
        first_added = min((i for i in added if isinstance(i, int)), default=None)
        unicode_to_byte = {ch: b for b, ch in _bytes_to_unicode().items()}
        ranks: dict[bytes, int] = {}
        for key, rank in vocab.items():
            if not isinstance(rank, int) or (first_added is not None and rank >= first_added):
                continue
            try:
                ranks[bytes(unicode_to_byte[ch] for ch in key)] = rank
            except KeyError:
                raise UserError(
                    f"{path}: vocab entry {key!r} is not byte-level BPE (GPT-2 byte alphabet); {fix}"
                ) from None
        _check_ranks(ranks, path, fix)
        return cls(ranks)


def _check_ranks(ranks: dict[bytes, int], path: Path, fix: str) -> None:
    """tiktoken needs ranks 0..n-1, one per token, and every single byte to fall back on."""
    if not ranks:
        raise UserError(f"tokenizer file {path} is empty; {fix}")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: token ranks are not 0..{len(ranks) - 1} without gaps or repeats; {fix}")
    missing = sum(bytes([b]) not in ranks for b in range(256))
    if missing:
        raise UserError(f"{path}: {missing} of the 256 single-byte tokens are missing; {fix}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the rest for 256+n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def find_tokenizer(model_dir: Path, explicit: str | None) -> Path:
    """The tokenizer to use: `--tokenizer` if given, else the usual places inside the model dir."""
    if explicit:
        return Path(explicit)
    candidates = [
        model_dir / "tokenizer.model",
        model_dir / "original" / "tokenizer.model",
        model_dir / "tokenizer.json",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise UserError(f"no tokenizer found (looked for {looked}); pass --tokenizer PATH")


def load_tokenizer(path: Path) -> Tokenizer:
    """Read either format, chosen by the file name's suffix."""
    if Path(path).suffix == ".json":
        return Tokenizer.from_hf_json(path)
    return Tokenizer.from_file(path)


def demo_tokenizer() -> Tokenizer:
    """The small tokenizer shipped for runs without downloaded weights (4096 + 256 ids)."""
    return Tokenizer.from_file(DEMO_TOKENIZER)

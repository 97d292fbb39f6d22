"""Byte-level BPE tokenizers run by tiktoken, and the chat template that turns messages into a prompt.

Every on-disk form is read into the same `{token bytes: id}` table plus special tokens: Meta's
`tokenizer.model` (one `base64 rank` line per token, Llama 3's 256 special tokens after them),
a Hugging Face `tokenizer.json` of any byte-level BPE model, and a GGUF's `tokenizer.ggml.*`
metadata (read in gguf_checkpoint.py); the last two spell tokens in GPT-2's printable stand-ins
for bytes. The pre-tokenizer (the regex that cuts text into words before BPE) is the model's own.
"""
from __future__ import annotations

import base64
import binascii
import copy
import json
from collections.abc import Iterable
from pathlib import Path

import tiktoken

from ..errors import UserError
from .chat_template import ChatTemplate

# Llama 3's pre-tokenizer.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's (Hugging Face's ByteLevel pre-tokenizer with use_regex).
GPT2_PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# GPT-2's applied after every digit was split off on its own (Hugging Face's Digits(individual_digits)
# then ByteLevel; llama.cpp's "smollm"), as one regex: no ` ?\p{N}+`, and a run of spaces before a
# digit ends there as it ended the text piece the digit split off.
DIGITS_GPT2_PAT_STR = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
# A GGUF names its pre-tokenizer (`tokenizer.ggml.pre`) as llama.cpp does.
GGUF_PRE_TOKENIZERS = {"llama-bpe": PAT_STR, "smollm": DIGITS_GPT2_PAT_STR, "gpt-2": GPT2_PAT_STR}

NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
}
# Llama 3's end tokens stop generation wherever the vocabulary has them, whatever else the metadata says.
LLAMA3_STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
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
    """Text <-> token ids, stop tokens, and the chat template.

    Without `special_tokens` this is Llama 3's layout: 256 special tokens numbered right after the
    base ranks, `<|begin_of_text|>` as BOS. Without a `chat_template`, prompts use Llama 3's chat
    format, which needs Llama 3's header tokens.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None, *,
                 pat_str: str = PAT_STR, bos_id: int | None = None, eos_id: int | None = None,
                 stop_ids: Iterable[int] = (), chat_template: ChatTemplate | None = None,
                 where: str = "the tokenizer"):
        if special_tokens is None:
            num_base = len(mergeable_ranks)
            special_tokens = {name: num_base + i for i, name in enumerate(_special_token_names())}
            bos_id, eos_id = special_tokens["<|begin_of_text|>"], special_tokens["<|end_of_text|>"]
        self.special_tokens = special_tokens
        self.vocab_size = len(mergeable_ranks) + len(special_tokens)
        # A vocabulary may lack single bytes (SmolLM2 lacks 21). tiktoken cannot encode text holding
        # one, so each gets a stand-in id past the vocabulary, dropped from the output, as Hugging
        # Face's BPE drops characters it has no token for.
        absent = [bytes([b]) for b in range(256) if bytes([b]) not in mergeable_ranks]
        self._stand_ins = frozenset(range(self.vocab_size, self.vocab_size + len(absent)))
        ranks = mergeable_ranks | {b: self.vocab_size + i for i, b in enumerate(absent)}
        self._enc = tiktoken.Encoding(name=f"bpe-{self.vocab_size}", pat_str=pat_str, mergeable_ranks=ranks,
                                      special_tokens=special_tokens)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.stop_ids: frozenset[int] = frozenset(
            {*stop_ids, *([] if eos_id is None else [eos_id]),
             *(special_tokens[name] for name in LLAMA3_STOP_TOKENS if name in special_tokens)})
        self.chat_template = chat_template
        self.where = where

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Encode `text` as plain text: `<|eot_id|>` typed by a user stays ordinary characters."""
        ids = self._drop_stand_ins(self._enc.encode_ordinary(text))
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        """Bytes that are not valid UTF-8 (a cut-off multi-byte character) decode as U+FFFD."""
        return self._enc.decode(ids, errors="replace")

    def _drop_stand_ins(self, ids: list[int]) -> list[int]:
        return [i for i in ids if i not in self._stand_ins] if self._stand_ins else ids

    def token_name(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._enc.decode_single_token_bytes(token_id).decode("utf-8", "replace")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A conversation of `{"role", "content"}` dicts as a prompt ending ready for the reply: through
        the model's own chat template (special tokens it writes become their ids, as in Hugging Face's
        apply_chat_template), else Llama 3's format."""
        if self.chat_template is None:
            return self._llama3_chat(messages)
        names = {"bos_token": self.token_name(self.bos_id), "eos_token": self.token_name(self.eos_id)}
        text = self.chat_template.render(messages, {k: v for k, v in names.items() if v is not None})
        return self._drop_stand_ins(self._enc.encode(text, allowed_special="all"))

    def describe_chat(self) -> str:
        return (f"the model's own chat template ({self.chat_template.origin})" if self.chat_template
                else "Llama 3's chat format")

    def check_chat(self) -> None:
        """Fail now, before any weights load, if prompts cannot be made: no usable template, or one
        that does not render a plain question."""
        self.encode_chat([{"role": "user", "content": "Hello?"}])

    def _llama3_chat(self, messages: list[dict]) -> list[int]:
        """Llama 3's chat format; the content is plain text, so special-token names in it stay text."""
        sp = self.special_tokens
        if not all(name in sp for name in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                           "<|eot_id|>")):
            raise UserError(f"{self.where} has no chat template and is not Llama 3's, whose chat format is the "
                            "fallback; use the model's GGUF or a folder with its tokenizer_config.json")

        def header(role: str) -> list[int]:
            return [sp["<|start_header_id|>"], *self.encode(role), sp["<|end_header_id|>"], *self.encode("\n\n")]

        ids = [sp["<|begin_of_text|>"]]
        for message in messages:
            ids += [*header(message["role"]), *self.encode(message["content"].strip()), sp["<|eot_id|>"]]
        return ids + header("assistant")

    def with_model_config(self, tokenizer_config: dict, generation_config: dict, where: str) -> Tokenizer:
        """This tokenizer with what a Hugging Face checkpoint's `tokenizer_config.json` (chat template,
        BOS and EOS tokens) and `generation_config.json` (EOS ids) say; both may be empty."""
        tok = copy.copy(self)
        template = tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        if template is not None:
            if not isinstance(template, str):
                raise UserError(f"{where}: chat_template is not a string; re-download it")
            tok.chat_template = ChatTemplate(template, where, "tokenizer_config.json")
        bos, eos = (self._config_token(tokenizer_config.get(key), where) for key in ("bos_token", "eos_token"))
        ids = generation_config.get("eos_token_id")
        extra = ids if isinstance(ids, list) else [] if ids is None else [ids]
        if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in extra):
            raise UserError(f"generation_config.json beside {where}: eos_token_id {ids!r} is not a token id of "
                            f"this {self.vocab_size}-token vocabulary; re-download it")
        tok.bos_id = self.bos_id if bos is None else bos
        tok.eos_id = self.eos_id if eos is None else eos
        tok.stop_ids = self.stop_ids | set(extra) | ({eos} if eos is not None else set())
        return tok

    def _config_token(self, value: object, where: str) -> int | None:
        """A special token named in tokenizer_config.json (a string or an AddedToken dict) as its id."""
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            return None
        if value not in self.special_tokens:
            raise UserError(f"{where} names {value!r} as a special token, but the tokenizer has no such token; "
                            "the tokenizer and its config are of different models: re-download them")
        return self.special_tokens[value]

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
        missing = sum(bytes([b]) not in ranks for b in range(256))
        if missing:
            raise UserError(f"{path}: {missing} of the 256 single-byte tokens are missing; {fix}")
        return cls(ranks, where=str(path))

    @classmethod
    def from_hf_json(cls, path: str | Path) -> Tokenizer:
        """Read a Hugging Face `tokenizer.json` of byte-level BPE (Llama 3's, SmolLM2's, GPT-2's, ...)."""
        path = Path(path)
        fix = "pass --tokenizer with the model's own byte-level BPE tokenizer.json or Llama 3's tokenizer.model"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"tokenizer file {path} does not exist; {fix}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {path} as JSON ({e}); {fix}") from None
        model = doc.get("model") if isinstance(doc, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not isinstance(vocab, dict) or model.get("type") != "BPE" or model.get("byte_fallback"):
            raise UserError(f"{path} has no byte-level BPE model.vocab; {fix}")
        if doc.get("normalizer") is not None:
            raise UserError(f"{path} normalizes text before BPE ({_kind(doc['normalizer'])}), which byte-level BPE "
                            f"models do not and this engine cannot; {fix}")
        specials = {t.get("content"): t.get("id") for t in doc.get("added_tokens") or [] if isinstance(t, dict)}
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in specials.items()):
            raise UserError(f"{path}: added_tokens are not {{content, id}} entries; {fix}")
        special_ids = set(specials.values())
        normal = {key: rank for key, rank in vocab.items() if not (isinstance(rank, int) and rank in special_ids)}
        merges = model.get("merges")
        return cls.from_byte_level(normal, specials, merges if isinstance(merges, list) else None,
                                   _hf_pre_tokenizer(doc.get("pre_tokenizer"), path, fix), str(path), fix)

    @classmethod
    def from_byte_level(cls, vocab: dict[str, int], specials: dict[str, int], merges: list | None,
                        pat_str: str, where: str, fix: str, **kwargs) -> Tokenizer:
        """A tokenizer from tokens spelled in GPT-2's byte alphabet (`vocab`), `specials` kept as text,
        and `merges` ("a b" strings or [a, b] pairs) in priority order.

        tiktoken merges the pair whose result has the lowest id, BPE the pair listed first; the two
        agree when the merges' results have increasing ids, which is checked.
        """
        unicode_to_byte = {ch: b for b, ch in _bytes_to_unicode().items()}
        ranks: dict[bytes, int] = {}
        for key, rank in vocab.items():
            if not isinstance(rank, int):
                raise UserError(f"{where}: vocab entry {key!r} has id {rank!r}, not a number; {fix}")
            try:
                ranks[bytes(unicode_to_byte[ch] for ch in key)] = rank
            except KeyError:
                raise UserError(f"{where}: vocab entry {key!r} is not byte-level BPE (GPT-2 byte alphabet); "
                                f"{fix}") from None
        if len(ranks) != len(vocab):
            raise UserError(f"{where}: two vocab entries spell the same bytes; {fix}")
        _check_ranks(ranks, where, fix, specials)
        if merges:
            _check_merges(merges, vocab, where, fix)
        return cls(ranks, specials, pat_str=pat_str, where=where, **kwargs)


def _kind(spec: object) -> str:
    return str(spec.get("type")) if isinstance(spec, dict) else repr(spec)


def _hf_pre_tokenizer(spec: object, path: Path, fix: str) -> str:
    """The regex that does what a tokenizer.json's pre_tokenizer does, for the forms byte-level BPE
    models use: ByteLevel alone (GPT-2), Split(regex) then ByteLevel (Llama 3), Digits then
    ByteLevel (SmolLM2)."""
    def is_byte_level(p: object, use_regex: bool) -> bool:
        return (isinstance(p, dict) and p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and p.get("use_regex", True) == use_regex)

    parts = spec.get("pretokenizers") if isinstance(spec, dict) and spec.get("type") == "Sequence" else [spec]
    if isinstance(parts, list) and len(parts) == 1 and is_byte_level(parts[0], True):
        return GPT2_PAT_STR
    if isinstance(parts, list) and len(parts) == 2 and isinstance(parts[0], dict):
        first = parts[0]
        if (first.get("type") == "Split" and first.get("behavior") == "Isolated" and not first.get("invert")
                and isinstance(first.get("pattern"), dict) and isinstance(first["pattern"].get("Regex"), str)
                and is_byte_level(parts[1], False)):
            return first["pattern"]["Regex"]
        if first.get("type") == "Digits" and first.get("individual_digits") and is_byte_level(parts[1], True):
            return DIGITS_GPT2_PAT_STR
    shown = [_kind(p) for p in parts] if isinstance(parts, list) else _kind(spec)
    raise UserError(f"{path}: pre_tokenizer {shown} is not one this engine runs (ByteLevel; Split(regex) then "
                    f"ByteLevel; Digits then ByteLevel); {fix}")


def _check_ranks(ranks: dict[bytes, int], where: str | Path, fix: str, specials: dict[str, int] | None = None) -> None:
    """Token ids must be 0..n-1, one per token, counting the special tokens."""
    if not ranks:
        raise UserError(f"tokenizer file {where} is empty; {fix}")
    ids = sorted([*ranks.values(), *(specials or {}).values()])
    if ids != list(range(len(ids))):
        raise UserError(f"{where}: token ids are not 0..{len(ids) - 1} without gaps or repeats; {fix}")


def _check_merges(merges: list, vocab: dict[str, int], where: str, fix: str) -> None:
    """Each merge must make a token of the vocabulary, with ids increasing down the list (see from_byte_level)."""
    last = -1
    for merge in merges:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise UserError(f"{where}: merge {merge!r} is not a pair of tokens; {fix}")
        made = vocab.get(pair[0] + pair[1])
        if made is None:
            raise UserError(f"{where}: merge {merge!r} makes a token the vocabulary lacks; {fix}")
        if made <= last:
            raise UserError(f"{where}: merges are not in the order of their tokens' ids (at {merge!r}), so tiktoken "
                            f"cannot apply them; {fix}")
        last = made


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

import base64
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllama.errors import UserError
from pagedllama.io.tokenizer import (
    DEMO_TOKENIZER,
    PAT_STR,
    Tokenizer,
    _bytes_to_unicode,
    demo_tokenizer,
    find_tokenizer,
    load_tokenizer,
)

MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b"ld", b" wor", b" world"]
NUM_BASE = 256 + len(MERGES)


def tiny_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for token in MERGES:
        ranks[token] = len(ranks)
    return ranks


def write_model(path: Path, ranks: dict[bytes, int]) -> Path:
    lines = [base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in ranks.items()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# Llama 3's tokenizer.json cuts words with its regex, then maps bytes to GPT-2's alphabet.
LLAMA3_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def spelled(token: bytes) -> str:
    to_unicode = _bytes_to_unicode()
    return "".join(to_unicode[b] for b in token)


def merges_of(ranks: dict[bytes, int]) -> list[str]:
    """The merge list behind tiktoken ranks: each multi-byte token, in rank order, from its lowest-ranked
    split into two tokens (how Llama 3's tokenizer.json was made from its tiktoken file)."""
    merges = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.get):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        left, right = min(splits, key=lambda s: max(ranks[s[0]], ranks[s[1]]))
        merges.append(f"{spelled(left)} {spelled(right)}")
    return merges


def write_hf_json(path: Path, ranks: dict[bytes, int], specials_in_vocab: bool = False) -> Path:
    vocab = {spelled(tok): rank for tok, rank in ranks.items()}
    names = Tokenizer(ranks).special_tokens
    if specials_in_vocab:
        vocab.update(names)
    added = [{"id": i, "content": name, "special": True} for name, i in names.items()]
    doc = {"version": "1.0", "added_tokens": added, "normalizer": None, "pre_tokenizer": LLAMA3_PRE_TOKENIZER,
           "model": {"type": "BPE", "vocab": vocab, "merges": merges_of(ranks)}}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(tiny_ranks())


def test_special_ids_follow_base_ranks(tok):
    assert tok.vocab_size == NUM_BASE + 256
    sp = tok.special_tokens
    assert (tok.bos_id, tok.eos_id, sp["<|eom_id|>"], sp["<|eot_id|>"]) == (NUM_BASE, NUM_BASE + 1, NUM_BASE + 8,
                                                                           NUM_BASE + 9)
    assert sp["<|start_header_id|>"] == NUM_BASE + 6 and sp["<|end_header_id|>"] == NUM_BASE + 7
    assert sp["<|reserved_special_token_0|>"] == NUM_BASE + 2
    assert sp["<|reserved_special_token_3|>"] == NUM_BASE + 5
    assert sp["<|reserved_special_token_4|>"] == NUM_BASE + 10
    assert sp["<|reserved_special_token_249|>"] == NUM_BASE + 255
    assert sorted(sp.values()) == list(range(NUM_BASE, NUM_BASE + 256))
    assert tok.stop_ids == frozenset({NUM_BASE + 1, NUM_BASE + 8, NUM_BASE + 9})


def test_encode_uses_merges(tok):
    hello, world = tiny_ranks()[b"hello"], tiny_ranks()[b" world"]
    assert tok.encode("hello world") == [hello, world]


def test_chat_template_exact_ids(tok):
    b = NUM_BASE
    hello = tiny_ranks()[b"hello"]
    ids = tok.encode_chat([{"role": "user", "content": "  hello\n"}])
    user, assistant = [117, 115, 101, 114], list(b"assistant")
    assert ids == [b, b + 6, *user, b + 7, 10, 10, hello, b + 9, b + 6, *assistant, b + 7, 10, 10]


def test_chat_template_several_messages(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    ids = tok.encode_chat(messages)
    assert ids.count(tok.special_tokens["<|eot_id|>"]) == 2 and ids.count(tok.bos_id) == 1
    assert tok.decode(ids[1:]) == (
        "<|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_special_token_text_in_user_content_stays_text(tok):
    text = "what does <|eot_id|> or <|begin_of_text|> mean?"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    chat = tok.encode_chat([{"role": "user", "content": text}])
    assert chat.count(tok.special_tokens["<|eot_id|>"]) == 1 and chat.count(tok.bos_id) == 1


ROUND_TRIP = ["", "hello world", "héllo wörld", "東京に行きます 🙂🗼", "tabs\tand\r\nlines\n\n\n", "  "]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_invalid_utf8_is_replaced(tok):
    partial = list("東".encode())[:2]
    assert tok.decode(partial) == "\ufffd"
    assert tok.decode([*partial, *tok.encode("ok")]) == "\ufffdok"


def test_from_file_matches_constructor(tmp_path, tok):
    loaded = Tokenizer.from_file(write_model(tmp_path / "tokenizer.model", tiny_ranks()))
    text = "hello world, <|eot_id|> héllo"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.vocab_size == tok.vocab_size


def _error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        Tokenizer.from_file(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "--tokenizer" in message
    return message


def test_bad_tokenizer_files(tmp_path):
    assert "does not exist" in _error(tmp_path / "missing.model")
    (tmp_path / "empty.model").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.model")
    # The start of a sentencepiece model (Llama 1/2): protobuf bytes, not `base64 rank` lines.
    (tmp_path / "sp.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\n\x0c\n\x03<s>\x15\x00\x00")
    assert "sentencepiece" in _error(tmp_path / "sp.model")
    gap = tiny_ranks()
    gap[b"hello"] = 999
    assert "without gaps" in _error(write_model(tmp_path / "gap.model", gap))
    no_bytes = {tok: rank - 1 for tok, rank in tiny_ranks().items() if tok != b"\x00"}
    assert "single-byte" in _error(write_model(tmp_path / "nobytes.model", no_bytes))


def test_not_base64_names_line(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nnot-base64!! 1\n")
    assert "line 2" in _error(path)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        Tokenizer.from_file(tmp_path)


def test_gpt2_byte_alphabet():
    table = _bytes_to_unicode()
    assert table[ord(" ")] == "\u0120" and table[ord("\n")] == "\u010a" and table[0] == "\u0100"
    assert table[ord("!")] == "!" and table[0xFF] == "\u00ff"
    assert len(set(table.values())) == 256


@pytest.mark.parametrize("specials_in_vocab", [False, True])
def test_hf_json_gives_same_ids(tmp_path, tok, specials_in_vocab):
    path = write_hf_json(tmp_path / "tokenizer.json", tiny_ranks(), specials_in_vocab)
    hf = Tokenizer.from_hf_json(path)
    assert hf.vocab_size == tok.vocab_size
    for text in ["hello world", "héllo\n\nwörld 🙂", "<|eot_id|>"]:
        assert hf.encode(text) == tok.encode(text)
    assert hf.encode_chat([{"role": "user", "content": "hi"}]) == tok.encode_chat([{"role": "user", "content": "hi"}])


def test_hf_json_key_spelling(tmp_path):
    doc = json.loads(write_hf_json(tmp_path / "t.json", tiny_ranks()).read_text())
    assert doc["model"]["vocab"]["\u0120world"] == tiny_ranks()[b" world"]


def test_demo_tokenizer_hf_json_round_trip(tmp_path):
    demo = demo_tokenizer()
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in DEMO_TOKENIZER.read_text().splitlines())}
    hf = load_tokenizer(write_hf_json(tmp_path / "tokenizer.json", ranks))
    text = "Can you plan a five-day itinerary for Zürich? 東京 too 🙂\n\n```python\nprint(1)\n```"
    assert hf.encode(text) == demo.encode(text)


def test_bad_hf_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="as JSON"):
        Tokenizer.from_hf_json(path)
    path.write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(UserError, match="byte-level BPE"):
        Tokenizer.from_hf_json(path)
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"▁hello": 0}}, "pre_tokenizer": LLAMA3_PRE_TOKENIZER}))
    with pytest.raises(UserError, match="not byte-level BPE"):
        Tokenizer.from_hf_json(path)
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Metaspace"}}))
    with pytest.raises(UserError, match=r"pre_tokenizer \['Metaspace'\] is not one this engine runs"):
        Tokenizer.from_hf_json(path)
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.from_hf_json(tmp_path / "missing.json")


def test_find_tokenizer_order(tmp_path):
    with pytest.raises(UserError) as info:
        find_tokenizer(tmp_path, None)
    assert "--tokenizer PATH" in str(info.value) and str(tmp_path / "original" / "tokenizer.model") in str(info.value)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert find_tokenizer(tmp_path, None) == tmp_path / "tokenizer.json"
    (tmp_path / "original").mkdir()
    write_model(tmp_path / "original" / "tokenizer.model", tiny_ranks())
    assert find_tokenizer(tmp_path, None) == tmp_path / "original" / "tokenizer.model"
    write_model(tmp_path / "tokenizer.model", tiny_ranks())
    assert find_tokenizer(tmp_path, None) == tmp_path / "tokenizer.model"
    assert find_tokenizer(tmp_path, "elsewhere/tok.json") == Path("elsewhere/tok.json")


def test_load_tokenizer_dispatches_on_suffix(tmp_path, tok):
    model = load_tokenizer(write_model(tmp_path / "tokenizer.model", tiny_ranks()))
    hf = load_tokenizer(write_hf_json(tmp_path / "tokenizer.json", tiny_ranks()))
    assert model.encode("hello world") == hf.encode("hello world") == tok.encode("hello world")


def test_demo_tokenizer():
    demo = demo_tokenizer()
    assert demo.vocab_size == 4352 and demo.bos_id == 4096 and demo.special_tokens["<|eot_id|>"] == 4105
    text = "How do I make banana bread without it coming out too dry?"
    ids = demo.encode(text)
    assert demo.decode(ids) == text and len(ids) < len(text) / 3


def test_demo_tokenizer_is_reproducible(monkeypatch):
    """The committed file is exactly what tools/make_demo_tokenizer.py trains."""
    script = Path(__file__).resolve().parent.parent / "tools" / "make_demo_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_demo_tokenizer", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    tokens = module.train(module.corpus_words(module.DATA), module.NUM_BASE_RANKS)
    committed = [base64.b64decode(line.split()[0]) for line in DEMO_TOKENIZER.read_text().splitlines()]
    assert tokens == committed

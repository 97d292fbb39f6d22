"""Fuzzing the loaders: whatever bytes a user points us at, the answer is a result or a `UserError`.

A `UserError` is printed as one line with the fix; any other exception would reach the user as
"internal error" (or, in a library caller, a traceback). Each loader gets random input and
damaged copies of valid input; a per-example alarm turns a hang into a failure.
"""
from __future__ import annotations

import base64
import json
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoint_writers import meta_params, save_hf, save_meta
from pagedllama.errors import UserError
from pagedllama.io.checkpoint import load_checkpoint, random_state_dict
from pagedllama.io.data import load_sharegpt
from pagedllama.io.tokenizer import Tokenizer
from pagedllama.model.config import ModelArgs

FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
HANG_S = 10


@contextmanager
def no_hang(seconds: int = HANG_S):
    """Fail an example that runs for `seconds` (Python code only: a hang inside C is not interrupted)."""
    def alarm(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def result_or_user_error(fn, *args):
    """fn(*args), or None when it raised UserError with a one-line message; anything else fails the test."""
    with no_hang():
        try:
            return fn(*args)
        except UserError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
            return None


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="pagedllama-fuzz-") as d:
        yield Path(d)


def fresh(scratch: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=scratch))


# --- ShareGPT data -----------------------------------------------------------------------------

_json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_any_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
_role = st.sampled_from(["human", "Human", "user", "gpt", "assistant", "system", ""]) | _json_leaf
_turn = st.fixed_dictionaries({"from": _role, "value": st.text(max_size=30) | _json_leaf}) | _any_json
_entry = (st.fixed_dictionaries({"conversations": st.lists(_turn, max_size=4) | _any_json},
                                optional={"id": _json_leaf}) | _any_json)
_sharegpt_like = st.lists(_entry, max_size=6)


def check_sharegpt(path: Path) -> None:
    got = result_or_user_error(load_sharegpt, path)
    if got is not None:
        conversations, skipped = got
        assert conversations and skipped >= 0
        assert all(c.prompt.strip() and isinstance(c.id, str) for c in conversations)


@FUZZ
@given(doc=_sharegpt_like | _any_json)
def test_sharegpt_random_json(scratch, doc):
    path = fresh(scratch) / "data.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    check_sharegpt(path)


@FUZZ
@given(data=st.binary(max_size=300) | _sharegpt_like.map(lambda d: json.dumps(d).encode()).flatmap(
    lambda b: st.tuples(st.just(b), st.integers(0, len(b)), st.binary(max_size=4)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):])))
def test_sharegpt_random_bytes(scratch, data):
    path = fresh(scratch) / "data.json"
    path.write_bytes(data)
    check_sharegpt(path)


# --- tokenizer ---------------------------------------------------------------------------------

def _valid_tokenizer_bytes() -> bytes:
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"he", b"ll", b"hell", b"hello", b" w", b" wo"):
        ranks[token] = len(ranks)
    return b"\n".join(base64.b64encode(t) + b" " + str(r).encode() for t, r in ranks.items()) + b"\n"


VALID_TOKENIZER = _valid_tokenizer_bytes()


@st.composite
def mutated_tokenizer(draw) -> bytes:
    lines = VALID_TOKENIZER.splitlines(keepends=True)
    kind = draw(st.sampled_from(["drop_line", "dup_line", "edit_bytes", "truncate", "swap_ranks"]))
    i = draw(st.integers(0, len(lines) - 1))
    if kind == "drop_line":
        del lines[i]
    elif kind == "dup_line":
        lines.insert(draw(st.integers(0, len(lines))), lines[i])
    elif kind == "swap_ranks":
        j = draw(st.integers(0, len(lines) - 1))
        (a, ra), (b, rb) = lines[i].split(), lines[j].split()
        lines[i], lines[j] = a + b" " + rb + b"\n", b + b" " + ra + b"\n"
    data = b"".join(lines)
    if kind == "edit_bytes":
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(data) - 1))
            data = data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1:]
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    return data


def check_tokenizer(path: Path, reader=Tokenizer.from_file) -> None:
    tok = result_or_user_error(reader, path)
    if tok is not None:  # whatever loaded must work
        with no_hang():
            ids = tok.encode_chat([{"role": "user", "content": "hello world ü"}])
            assert all(0 <= i < tok.vocab_size for i in ids)
            assert "hello world ü" in tok.decode(ids)


@FUZZ
@given(data=st.binary(max_size=400) | mutated_tokenizer())
def test_tokenizer_model_random_and_mutated(scratch, data):
    path = fresh(scratch) / "tokenizer.model"
    path.write_bytes(data)
    check_tokenizer(path)


@settings(FUZZ, max_examples=30)
@given(data=st.binary(max_size=200) | _any_json.map(lambda d: json.dumps({"model": {"type": "BPE", "vocab": d}})
                                                    .encode()))
def test_tokenizer_json_random(scratch, data):
    path = fresh(scratch) / "tokenizer.json"
    path.write_bytes(data)
    check_tokenizer(path, Tokenizer.from_hf_json)


# --- checkpoints -------------------------------------------------------------------------------

ARGS = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32, hidden_dim=48)


@pytest.fixture(scope="module")
def checkpoints(scratch) -> dict[str, Path]:
    sd = random_state_dict(ARGS, seed=0)
    save_meta(sd, meta_params(ARGS, multiple_of=16, ffn_dim_multiplier=None), scratch / "meta")
    save_hf(sd, ARGS, scratch / "hf")
    for fmt in ("meta", "hf"):  # both load as they are
        assert load_checkpoint(scratch / fmt)[0] == ARGS
    return {"meta": scratch / "meta", "hf": scratch / "hf"}


WEIGHTS = {"meta": "consolidated.00.pth", "hf": "model.safetensors"}


@st.composite
def damage(draw, size: int):
    """('truncate', at) or ('flip', [(position, xor mask), ...])."""
    if draw(st.booleans()):
        return "truncate", draw(st.integers(0, size - 1))
    flips = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)), min_size=1, max_size=8))
    return "flip", flips


@pytest.mark.parametrize("fmt", ["meta", "hf"])
@settings(FUZZ, max_examples=50, suppress_health_check=[HealthCheck.too_slow,
                                                        HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_checkpoint(scratch, checkpoints, fmt, data):
    src = checkpoints[fmt]
    weights = (src / WEIGHTS[fmt]).read_bytes()
    kind, how = data.draw(damage(len(weights)), label="damage")
    if kind == "truncate":
        damaged = weights[:how]
    else:
        buf = bytearray(weights)
        for pos, mask in how:
            buf[pos] ^= mask
        damaged = bytes(buf)
    d = fresh(scratch)
    for f in src.iterdir():
        (d / f.name).write_bytes(damaged if f.name == WEIGHTS[fmt] else f.read_bytes())
    got = result_or_user_error(load_checkpoint, d)
    if got is not None:
        assert got[0] == ARGS

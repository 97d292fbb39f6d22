import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

from pagedllama.app.workload import build_requests
from pagedllama.errors import UserError
from pagedllama.io.data import Conversation, default_data_path, load_sharegpt
from pagedllama.io.tokenizer import demo_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def chat(*turns: tuple[str, str], id: str = "x") -> dict:
    return {"id": id, "conversations": [{"from": role, "value": value} for role, value in turns]}


def test_first_human_turn_and_first_answer_after_it(tmp_path):
    data = [
        chat(("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2"), id="multi"),
        chat(("gpt", "hello!"), ("human", "q"), ("gpt", "a"), id="gpt-first"),
        chat(("human", "only a question"), id="unanswered"),
        chat(("human", "q"), ("system", "note"), ("gpt", "a"), id="other-role"),
    ]
    conversations, skipped = load_sharegpt(write(tmp_path, data))
    assert skipped == 0
    assert conversations == [
        Conversation("multi", "q1", "a1"),
        Conversation("gpt-first", "q", "a"),
        Conversation("unanswered", "only a question", ""),
        Conversation("other-role", "q", "a"),
    ]


def test_requests_generate_the_reference_length_within_the_context():
    """With reference lengths (the demo), a request asks for its answer's token count, capped at the
    room its prompt leaves in the context; an unanswered prompt still asks for one token."""
    tok = demo_tokenizer()
    convs = [Conversation("short", "q", "one two three"), Conversation("long", "q", "word " * 500),
             Conversation("none", "q", "")]
    prompt = len(tok.encode_chat([{"role": "user", "content": "q"}]))
    requests = build_requests(convs, tok, 3, max_seq_len=prompt + 100, max_new_tokens=None, reference_lengths=True)
    assert [r.max_new_tokens for r in requests] == [len(tok.encode("one two three")), 100, 1]


def test_unusable_entries_are_skipped_and_counted(tmp_path):
    data = [
        chat(("human", "keep me"), ("gpt", "ok"), id="good"),
        {"id": "empty", "conversations": []},
        chat(("gpt", "no question here"), id="no-human"),
        {"id": "missing"},
        {"id": "not-a-list", "conversations": "human: hi"},
        "a string",
        None,
        {"id": "turn-not-dict", "conversations": ["hi"]},
        {"id": "value-not-str", "conversations": [{"from": "human", "value": 3}]},
        {"id": "no-from", "conversations": [{"value": "hi"}]},
        chat(("human", "   \n"), ("gpt", "blank prompt"), id="blank"),
        chat(("human", "second good"), ("gpt", "fine"), id="good2"),
    ]
    conversations, skipped = load_sharegpt(write(tmp_path, data))
    assert [c.id for c in conversations] == ["good", "good2"]
    assert skipped == len(data) - 2


def test_roles_are_case_insensitive_with_aliases(tmp_path):
    data = [
        chat(("Human", "q"), ("GPT", "a"), id="1"),
        chat(("user", "q"), ("ChatGPT", "a"), id="2"),
        chat(("USER", "q"), ("assistant", "a"), id="3"),
        chat(("human", "q"), ("bard", "a"), id="4"),
    ]
    conversations, skipped = load_sharegpt(write(tmp_path, data))
    assert skipped == 0 and all(c.reference_answer == "a" for c in conversations)


def test_unicode_and_ids(tmp_path):
    data = [
        chat(("human", "Wie geht's? 東京 🙂"), ("gpt", "Très bien, merci ! 🎉"), id="ü"),
        {"conversations": [{"from": "human", "value": "no id"}]},
        {"id": 42, "conversations": [{"from": "human", "value": "numeric id"}]},
    ]
    conversations, _ = load_sharegpt(write(tmp_path, data))
    assert conversations[0] == Conversation("ü", "Wie geht's? 東京 🙂", "Très bien, merci ! 🎉")
    assert [c.id for c in conversations[1:]] == ["#1", "42"]


def _message(path: Path) -> str:
    with pytest.raises(UserError) as info:
        load_sharegpt(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path):
    message = _message(tmp_path / "nope.json")
    assert "does not exist" in message and "--data PATH" in message
    assert "python -m pagedllama.download --sharegpt" in message


def test_not_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"id": "a",\n   "conversations": [}\n]\n')
    message = _message(path)
    assert "not valid JSON" in message and "line 3 column" in message


def test_top_level_not_a_list(tmp_path):
    assert "not a list" in _message(write(tmp_path, {"id": "a", "conversations": []}))


def test_default_data_path():
    assert default_data_path() == ROOT / "sharegpt-filtered.json"
    assert default_data_path().is_file()


# The shipped sample.

@pytest.fixture(scope="module")
def shipped():
    entries = json.loads(default_data_path().read_text(encoding="utf-8"))
    conversations, skipped = load_sharegpt(default_data_path())
    return entries, conversations, skipped


def test_shipped_sample_shape(shipped):
    entries, conversations, skipped = shipped
    assert len(entries) >= 120
    roles = [[turn["from"] for turn in entry["conversations"]] for entry in entries]
    assert sum(1 for r in roles if r and r[0] == "gpt" and "human" in r) >= 3
    assert sum(1 for r in roles if r and "human" not in r) >= 2
    assert sum(1 for r in roles if not r) >= 1
    assert skipped == sum(1 for r in roles if "human" not in r)
    assert sum(1 for r in roles if r.count("human") >= 2) >= 10
    assert any(not c.prompt.isascii() for c in conversations)
    assert all(c.reference_answer for c in conversations)
    assert len({e["id"] for e in entries}) == len(entries)
    assert default_data_path().stat().st_size < 2_000_000


def test_shipped_sample_lengths(shipped):
    """Token lengths like ShareGPT's (vLLM paper: mean 161 in, 338 out) with a long tail."""
    _, conversations, _ = shipped
    tok = demo_tokenizer()
    prompts = [len(tok.encode(c.prompt)) for c in conversations]
    answers = [len(tok.encode(c.reference_answer)) for c in conversations]
    assert 120 <= statistics.mean(prompts) <= 200
    assert 280 <= statistics.mean(answers) <= 400
    assert max(prompts) > 1000 and max(answers) > 1500
    assert statistics.median(prompts) < statistics.mean(prompts)  # most are short
    assert statistics.median(answers) < statistics.mean(answers)


def test_shipped_sample_is_reproducible(monkeypatch):
    """The committed file is exactly what tools/make_sharegpt_sample.py writes."""
    script = ROOT / "tools" / "make_sharegpt_sample.py"
    spec = importlib.util.spec_from_file_location("make_sharegpt_sample", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert default_data_path().read_text(encoding="utf-8") == module.render()

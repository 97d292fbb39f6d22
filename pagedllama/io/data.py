"""ShareGPT conversations as benchmark requests: the first user turn and the reply to it.

Real ShareGPT exports are messy (chats that open with the assistant, empty chats, odd
role names), so unusable entries are counted and skipped rather than failing the run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

_HUMAN = {"human", "user"}
_GPT = {"gpt", "chatgpt", "assistant", "bard"}


@dataclass(frozen=True)
class Conversation:
    """A prompt and the answer the dataset gave (`""` when it has none), whose length sets the output budget."""

    id: str
    prompt: str
    reference_answer: str


def default_data_path() -> Path:
    """The sample shipped at the repo top level."""
    return Path(__file__).resolve().parents[2] / "sharegpt-filtered.json"


def load_sharegpt(path: str | Path) -> tuple[list[Conversation], int]:
    """Usable conversations in file order, and how many entries were skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"dataset {path} does not exist; pass --data PATH or run `python -m pagedllama.download --sharegpt`"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read dataset {path} ({e}); pass --data with a ShareGPT JSON file") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"dataset {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            "pass --data with a ShareGPT JSON file"
        ) from None
    except (ValueError, RecursionError) as e:  # a number too long to convert, nesting too deep
        raise UserError(f"dataset {path} cannot be read as JSON ({type(e).__name__}); "
                        "pass --data with a ShareGPT JSON file") from None
    if not isinstance(entries, list):
        raise UserError(
            f"dataset {path} holds a JSON {type(entries).__name__}, not a list of conversations; "
            "pass --data with a ShareGPT JSON file"
        )
    conversations = []
    for index, entry in enumerate(entries):
        conversation = parse_entry(entry, index)
        if conversation is not None:
            conversations.append(conversation)
    if not conversations:
        raise UserError(
            f"dataset {path} has no usable conversation: none of its {len(entries)} entries has a non-empty "
            'human turn ({"conversations": [{"from": "human", "value": "..."}, ...]}); '
            "pass --data with a ShareGPT JSON file"
        )
    return conversations, len(entries) - len(conversations)


def parse_entry(entry: object, index: int) -> Conversation | None:
    """The first human turn and the first gpt turn after it; None if unusable or the prompt is blank."""
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        return None
    turns: list[tuple[str, str]] = []
    for turn in entry["conversations"]:
        if not isinstance(turn, dict):
            return None
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(role, str) or not isinstance(value, str):
            return None
        turns.append((role.strip().lower(), value))
    first_human = next((i for i, (role, _) in enumerate(turns) if role in _HUMAN), None)
    if first_human is None or not turns[first_human][1].strip():
        return None
    answer = next((value for role, value in turns[first_human + 1:] if role in _GPT), "")
    entry_id = entry.get("id")
    return Conversation(
        id=str(entry_id) if entry_id is not None else f"#{index}",
        prompt=turns[first_human][1],
        reference_answer=answer,
    )

"""Checks of one row's fields and turns: every way a row can be bad, raised as BadRow.

A bad row stops the load with a DataError

    "{file} line|row {n} field '{field}': {reason}[: {detail}]"

(`field` is a path into the row, e.g. `response`, `messages[2].content`, `dialog[0]`; indexes count
from 0), unless `skip_bad_rows`, which drops the row and counts its reason (data.load).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from dialogtrain.data.sources import json_type_name, row_location

Message = dict[str, str]
Conversation = list[Message]

ROLE_NAMES = {"system": "system", "user": "user", "human": "user",
              "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
TRAILING_USER_NOTE = "trailing user turn removed"
EMPTY_SYSTEM_NOTE = "empty system message removed"


@dataclass(frozen=True)
class Preference:
    """One DPO pair: `prompt` is an optional system message then alternating turns ending with a user
    turn; `chosen` and `rejected` are the two assistant completions."""

    prompt: list[Message]
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Rating:
    """One KTO example: a `prompt` as a Preference's and one assistant `completion`, desirable (a thumbs up)
    or not (a thumbs down)."""

    prompt: list[Message]
    completion: str
    desirable: bool


class BadRow(Exception):
    """One row cannot be used: `reason` is the stable name counted in `DataReport.dropped`."""

    def __init__(self, field: str | None, reason: str, detail: str = ""):
        super().__init__(reason)
        self.field, self.reason, self.detail = field, reason, detail

    def message(self, file: str, n: int) -> str:
        where = f" field '{self.field}'" if self.field else ""
        return f"{row_location(file, n)}{where}: {self.reason}" + (f": {self.detail}" if self.detail else "")



class Turn(NamedTuple):
    role: str
    content: str
    field: str  # where it came from in the row, for messages


def present(row: dict, key: str) -> bool:
    return row.get(key) is not None


def required(row: dict, key: str, field: str) -> object:
    if not present(row, key):
        raise BadRow(field, "missing field")
    return row[key]


def checked_text(value: object, field: str) -> str:
    """`value` if it is a string of valid UTF-8; BadRow otherwise."""
    if not isinstance(value, str):
        raise BadRow(field, "wrong type", f"expected a string, got {json_type_name(value)}")
    bad = next((c for c in value if "\udc80" <= c <= "\udcff"), None)
    if bad is not None:
        raise BadRow(field, "not valid UTF-8", f"byte 0x{ord(bad) - 0xDC00:02x}")
    return value


def required_text(row: dict, key: str) -> str:
    return checked_text(required(row, key, key), key)


def optional_text(row: dict, key: str) -> str:
    """The string under `key`, or "" when it is absent or null."""
    return checked_text(row[key], key) if present(row, key) else ""


def required_list(row: dict, key: str) -> list:
    value = required(row, key, key)
    if not isinstance(value, list):
        raise BadRow(key, "wrong type", f"expected a list, got {json_type_name(value)}")
    return value


def message_turns(items: list, field: str) -> list[Turn]:
    """{role, content} or ShareGPT {from, value} dicts -> turns with roles normalised."""
    turns = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise BadRow(where, "wrong type", f"expected a message object, got {json_type_name(item)}")
        role_key, content_key = ("from", "value") if "from" in item and "role" not in item else ("role", "content")
        role = checked_text(required(item, role_key, f"{where}.{role_key}"), f"{where}.{role_key}")
        content = checked_text(required(item, content_key, f"{where}.{content_key}"), f"{where}.{content_key}")
        if role.strip().lower() not in ROLE_NAMES:
            raise BadRow(f"{where}.{role_key}", "unknown role",
                         f"{role!r}; expected system, user, assistant (or human, gpt, bot, model)")
        turns.append(Turn(ROLE_NAMES[role.strip().lower()], content, where))
    return turns


def without_empty_system(turns: list[Turn], notes: collections.Counter) -> list[Turn]:
    if turns and turns[0].role == "system" and not turns[0].content.strip():
        notes[EMPTY_SYSTEM_NOTE] += 1
        return turns[1:]
    return turns


def check_role_order(turns: list[Turn]) -> None:
    """Optional system first, then user, assistant, user, ... (any length)."""
    body = turns[1:] if turns and turns[0].role == "system" else turns
    for k, turn in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if turn.role == "system":
            raise BadRow(turn.field, "roles out of order", "a system message may only come first")
        if turn.role != expected:
            raise BadRow(turn.field, "roles out of order", f"expected {expected}, got {turn.role}")


def check_not_empty(turns: list[Turn]) -> None:
    for turn in turns:
        if turn.role != "system" and not turn.content.strip():
            raise BadRow(turn.field, f"empty {turn.role} turn")


def as_messages(turns: Iterable[Turn]) -> list[Message]:
    return [{"role": turn.role, "content": turn.content} for turn in turns]


def conversation_from_turns(turns: list[Turn], field: str, notes: collections.Counter) -> Conversation:
    """Validated conversation; a trailing user turn (nothing to learn after it) is removed and noted."""
    turns = without_empty_system(turns, notes)
    check_role_order(turns)
    if turns and turns[-1].role == "user":
        turns = turns[:-1]
        notes[TRAILING_USER_NOTE] += 1
    if not any(turn.role == "assistant" for turn in turns):
        raise BadRow(field, "no assistant turn")
    check_not_empty(turns)
    return as_messages(turns)


def prompt_from_turns(turns: list[Turn], field: str, notes: collections.Counter) -> list[Message]:
    """Validated DPO prompt: optional system, alternating turns, ending with a user turn."""
    turns = without_empty_system(turns, notes)
    if not turns:
        raise BadRow(field, "empty prompt")
    check_role_order(turns)
    if turns[-1].role != "user":
        raise BadRow(turns[-1].field, "prompt does not end with a user turn")
    check_not_empty(turns)
    return as_messages(turns)




LABEL_WORDS = {"true": True, "false": False}  # CSV cells are text: `label` may read true or false there


def checked_label(value: object, field: str) -> bool:
    """A rating's label: a JSON boolean, or the word true or false (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    raise BadRow(field, "wrong type", f"expected true or false, got {json_type_name(value)} {value!r}"
                 if isinstance(value, (str, int, float)) else f"expected true or false, got {json_type_name(value)}")


def checked_rating(prompt: list[Message], completion: str, desirable: bool, field: str = "completion") -> Rating:
    if not completion.strip():
        raise BadRow(field, "empty completion")
    return Rating(prompt=prompt, completion=completion, desirable=desirable)


def checked_preference(prompt: list[Message], chosen: str, rejected: str) -> Preference:
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise BadRow(key, "empty completion")
    if chosen.strip() == rejected.strip():
        raise BadRow("rejected", "chosen == rejected")
    return Preference(prompt=prompt, chosen=chosen, rejected=rejected)

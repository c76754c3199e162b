"""The data formats: which one a file's rows are in, and how a row becomes a conversation, a pair or a rating."""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from dataclasses import dataclass

from dialogtrain.data.rows import (
    BadRow,
    Conversation,
    Preference,
    Rating,
    Turn,
    as_messages,
    check_not_empty,
    checked_label,
    checked_preference,
    checked_rating,
    checked_text,
    conversation_from_turns,
    message_turns,
    optional_text,
    present,
    prompt_from_turns,
    required,
    required_list,
    required_text,
)
from dialogtrain.data.sources import json_type_name

# (user column, assistant column), first match wins: `instruction` goes before `input` because an
# instruction row may also carry an `input` that is joined to it.
PAIR_COLUMNS = (("query", "response"), ("prompt", "response"), ("question", "answer"),
                ("user", "assistant"), ("instruction", "output"), ("input", "output"))
MESSAGE_LIST_KEYS = ("messages", "conversations")
# `conversation` is what a chatterbot-corpus YAML file yields for each utterance list.
DIALOG_KEYS = ("dialog", "dialogue", "conversation")
GROUP_KEYS = ("conversation_id", "dialog_id")
HH_ASSISTANT = "\n\nAssistant:"
HH_MARKER = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class RowFormat:
    """How the rows of one file are read. `parse(row, notes)` returns an example or raises BadRow;
    `group(row)` is the key under which rows join into one conversation (None: the row stands alone)."""

    name: str
    parse: Callable[[dict, collections.Counter], object]
    group: Callable[[dict], str | None] = lambda row: None


def detect_conversation_format(row: dict) -> RowFormat | None:
    """The SFT format of a file, from the keys of its first row; None when no format fits."""
    for key in MESSAGE_LIST_KEYS:
        if key in row:
            return RowFormat(key, lambda r, notes, key=key: parse_message_list_row(r, notes, key))
    for key in DIALOG_KEYS:
        if key in row:
            return RowFormat(key, lambda r, notes, key=key: parse_dialog_row(r, notes, key))
    for user_key, assistant_key in PAIR_COLUMNS:
        if user_key in row and assistant_key in row:
            return RowFormat(f"{user_key}/{assistant_key}",
                             lambda r, notes, u=user_key, a=assistant_key: parse_pair_row(r, u, a),
                             group=conversation_group)
    return None


def parse_message_list_row(row: dict, notes: collections.Counter, key: str) -> Conversation:
    return conversation_from_turns(message_turns(required_list(row, key), key), key, notes)


def parse_dialog_row(row: dict, notes: collections.Counter, key: str) -> Conversation:
    """Utterances alternate user, assistant, starting with the user."""
    utterances = required_list(row, key)
    turns = [Turn("user" if i % 2 == 0 else "assistant", checked_text(text, f"{key}[{i}]"), f"{key}[{i}]")
             for i, text in enumerate(utterances)]
    return conversation_from_turns(turns, key, notes)


def parse_pair_row(row: dict, user_key: str, assistant_key: str) -> Conversation:
    """One exchange; `instruction` and a non-empty `input` are joined with a blank line."""
    user = required_text(row, user_key)
    if user_key == "instruction" and optional_text(row, "input").strip():
        user = f"{user}\n\n{optional_text(row, 'input')}"
    assistant = required_text(row, assistant_key)
    system = optional_text(row, "system")
    turns = [Turn("system", system, "system")] if system.strip() else []
    turns += [Turn("user", user, user_key), Turn("assistant", assistant, assistant_key)]
    check_not_empty(turns)
    return as_messages(turns)


def conversation_group(row: dict) -> str | None:
    for key in GROUP_KEYS:
        value = row.get(key)
        if value is not None and str(value).strip():
            return f"{key}={value}"
    return None


def join_grouped_exchanges(parsed: list[tuple[str | None, Conversation]]) -> list[Conversation]:
    """Exchanges sharing a group key join, in order, into the conversation where the key first
    appeared; the system message of every exchange after the first is dropped."""
    conversations: list[Conversation] = []
    slot: dict[str, int] = {}
    for group, conversation in parsed:
        if group is None:
            conversations.append(conversation)
        elif group in slot:
            conversations[slot[group]].extend(m for m in conversation if m["role"] != "system")
        else:
            slot[group] = len(conversations)
            conversations.append(list(conversation))
    return conversations


def detect_preference_format(row: dict) -> RowFormat | None:
    """The DPO format of a file, from its first row; None when no format fits."""
    if "chosen" not in row and "rejected" not in row and "label" not in row:
        return None
    if "question" in row and "chosen" in row:
        return RowFormat("system/question/chosen/rejected", lambda r, notes: parse_orca_row(r))
    if "prompt" in row or isinstance(row.get("chosen"), list):
        return RowFormat("prompt/chosen/rejected", parse_chosen_rejected_row)
    if "label" in row:  # a rating (chat --feedback writes both): each such row is refused by name
        return RowFormat("prompt/chosen/rejected", parse_chosen_rejected_row)
    if "chosen" in row:
        return RowFormat("Human/Assistant transcripts", parse_hh_row)
    return None



def parse_orca_row(row: dict) -> Preference:
    """Intel/orca_dpo_pairs: an empty system means no system message."""
    system, question = optional_text(row, "system"), required_text(row, "question")
    if not question.strip():
        raise BadRow("question", "empty prompt")
    prompt = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": question}]
    return checked_preference(prompt, required_text(row, "chosen"), required_text(row, "rejected"))


def parse_chosen_rejected_row(row: dict, notes: collections.Counter) -> Preference:
    """`prompt` (string or messages, optional `system`) with `chosen`/`rejected` strings or one assistant
    message each; or `chosen`/`rejected` full message lists sharing every message before the last."""
    if not present(row, "chosen") and present(row, "label"):
        raise BadRow("chosen", "rating, not a pair", "this row rates one completion (label); "
                                                       "`dialogtrain kto` trains on ratings")
    chosen = required(row, "chosen", "chosen")
    if not present(row, "prompt") and not isinstance(chosen, list):
        # Without a prompt, chosen and rejected must be whole conversations: blame chosen, not the prompt.
        raise BadRow("chosen", "wrong type", f"expected a message list (the row has no 'prompt'), "
                                             f"got {json_type_name(chosen)}")
    if isinstance(chosen, list) and (not present(row, "prompt") or len(chosen) > 1):
        return shared_prefix_preference(row, notes)
    return checked_preference(row_prompt(row, notes), completion_text(row, "chosen"), completion_text(row, "rejected"))


def row_prompt(row: dict, notes: collections.Counter) -> list[dict]:
    """`prompt` (a string or messages) with an optional `system` message in front, ending with a user turn."""
    turns = prompt_turns(row)
    system = optional_text(row, "system")
    if system.strip():
        if turns and turns[0].role == "system":
            raise BadRow("system", "roles out of order", "a system message in both 'system' and 'prompt'")
        turns.insert(0, Turn("system", system, "system"))
    return prompt_from_turns(turns, "prompt", notes)


def prompt_turns(row: dict) -> list[Turn]:
    prompt = required(row, "prompt", "prompt")
    if isinstance(prompt, list):
        return message_turns(prompt, "prompt")
    if not checked_text(prompt, "prompt").strip():
        raise BadRow("prompt", "empty prompt")
    return [Turn("user", prompt, "prompt")]


def completion_text(row: dict, key: str) -> str:
    """A string, or a list holding exactly one assistant message (TRL's conversational format)."""
    value = required(row, key, key)
    if isinstance(value, list):
        turns = message_turns(value, key)
        if len(turns) != 1 or turns[0].role != "assistant":
            raise BadRow(key, "wrong type", "expected a string or a list of one assistant message")
        return turns[0].content
    return checked_text(value, key)


def shared_prefix_preference(row: dict, notes: collections.Counter) -> Preference:
    chosen = message_turns(required_list(row, "chosen"), "chosen")
    rejected = message_turns(required_list(row, "rejected"), "rejected")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1].role != "assistant":
            raise BadRow(key, "no assistant turn", "the last message must be the assistant's completion")
    if [t[:2] for t in chosen[:-1]] != [t[:2] for t in rejected[:-1]]:
        raise BadRow("rejected", "prompts differ", "chosen and rejected must share every message but the last")
    prompt = prompt_from_turns(chosen[:-1], "chosen", notes)
    return checked_preference(prompt, chosen[-1].content, rejected[-1].content)


def parse_hh_row(row: dict, notes: collections.Counter) -> Preference:
    """Anthropic HH: full transcripts split at the last "\\n\\nAssistant:"; both prompts must match."""
    chosen_prompt, chosen = split_last_assistant_turn(required_text(row, "chosen"), "chosen")
    rejected_prompt, rejected = split_last_assistant_turn(required_text(row, "rejected"), "rejected")
    if chosen_prompt.strip() != rejected_prompt.strip():
        raise BadRow("rejected", "prompts differ", "the transcripts differ before the last assistant turn")
    prompt = prompt_from_turns(transcript_turns(chosen_prompt, "chosen"), "chosen", notes)
    return checked_preference(prompt, chosen.strip(), rejected.strip())


def split_last_assistant_turn(transcript: str, field: str) -> tuple[str, str]:
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow(field, "malformed transcript", "no '\\n\\nAssistant:' turn")
    return transcript[:cut], transcript[cut + len(HH_ASSISTANT):]


def transcript_turns(transcript: str, field: str) -> list[Turn]:
    """"\\n\\nHuman: a\\n\\nAssistant: b" -> user a, assistant b (contents stripped)."""
    text = transcript.lstrip()
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    preamble, *parts = HH_MARKER.split(text)
    if preamble.strip():
        raise BadRow(field, "malformed transcript", "text before the first '\\n\\nHuman:'")
    return [Turn("user" if speaker == "Human" else "assistant", content.strip(), field)
            for speaker, content in zip(parts[::2], parts[1::2])]



def detect_rating_format(row: dict) -> RowFormat | None:
    """The KTO format of a file, from its first row: completions rated with `label`, preference pairs, or both
    mixed (what `dialogtrain chat --feedback` writes); the kind is read from each row. None when no format fits."""
    if "label" in row or "completion" in row or detect_preference_format(row) is not None:
        return RowFormat("rated completions (prompt/completion/label) and pairs", parse_rating_row)
    return None


def parse_rating_row(row: dict, notes: collections.Counter) -> list[Rating]:
    """One rated completion, or the two of a preference pair (chosen desirable, rejected undesirable).

    A rating: `label` (true: desirable) and `prompt` (a string or messages, optional `system`) or `messages`
    with `completion` (a string or one assistant message); or `messages` ending with the rated assistant turn.
    """
    if not present(row, "label") and (pair_format := detect_preference_format(row)) is not None:
        pair = pair_format.parse(row, notes)
        return [Rating(pair.prompt, pair.chosen, True), Rating(pair.prompt, pair.rejected, False)]
    desirable = checked_label(required(row, "label", "label"), "label")
    if present(row, "prompt"):
        return [checked_rating(row_prompt(row, notes), completion_text(row, "completion"), desirable)]
    turns = message_turns(required_list(row, "messages"), "messages")
    if present(row, "completion"):
        return [checked_rating(prompt_from_turns(turns, "messages", notes), completion_text(row, "completion"),
                               desirable)]
    if not turns or turns[-1].role != "assistant":
        raise BadRow("messages", "no assistant turn", "without 'completion', the last message is the rated one")
    return [checked_rating(prompt_from_turns(turns[:-1], "messages", notes), turns[-1].content, desirable,
                           turns[-1].field)]


FORMAT_HELP_CONVERSATIONS = ("pairs (" + ", ".join("/".join(pair) for pair in PAIR_COLUMNS)
                             + "), messages or conversations (a message list), or dialog (utterances)")
FORMAT_HELP_RATINGS = ("prompt (or messages)/completion/label rows, messages ending with the rated reply plus "
                       "label, or preference pairs")
FORMAT_HELP_PREFERENCES = ("prompt/chosen/rejected, system/question/chosen/rejected, or chosen/rejected "
                           "(message lists or Human/Assistant transcripts)")

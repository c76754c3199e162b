"""Exact duplicates and train/eval overlap: found through a key per example, counted, and split around.

A key maps an example to a hashable value; examples with equal keys are the same. Every key
normalises the whitespace of each text (runs of spaces, tabs and newlines become one space, the ends
are stripped), so "Hi  there\\n" and "Hi there" are one text:

    conversation_key   the (role, text) of every turn: duplicate conversations, and the train/eval overlap
    preference_key     the prompt's turns, chosen and rejected: duplicate preference pairs
    prompt_key         the prompt's turns only: an eval pair whose prompt was trained on is not held out
    opening_key        a conversation's first user turn: the demo's and bench's held-out split

Nothing here knows more of an example than its key, so another kind of data brings its own keys.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

Key = Callable[[object], Hashable]


def normalised(text: str) -> str:
    """"  Hi\\t there \\n" -> "Hi there"."""
    return " ".join(text.split())


def conversation_key(messages: list[dict]) -> tuple:
    return tuple((message["role"], normalised(message["content"])) for message in messages)


def preference_key(pair) -> tuple:
    """A preference pair (.prompt messages, .chosen, .rejected): all three."""
    return conversation_key(pair.prompt), normalised(pair.chosen), normalised(pair.rejected)


def prompt_key(pair) -> tuple:
    return conversation_key(pair.prompt)


def opening_key(messages: list[dict]) -> tuple:
    """The first user turn of a conversation: conversations that open alike share every later prompt's start."""
    return conversation_key([next(message for message in messages if message["role"] == "user")])


@dataclass(frozen=True)
class Duplicates:
    """What a search for exact duplicates found. `first`: the index of the first example of each distinct
    key, in order (what de-duplication keeps); `copies`: the examples after the first of their key;
    `duplicated`: the distinct keys that have copies; `copies_by_file`: the copies each file holds."""

    first: list[int]
    copies: int
    duplicated: int
    copies_by_file: collections.Counter


def find_duplicates(examples: Sequence, key: Key, files: Sequence[str] | None = None) -> Duplicates:
    """Exact duplicates among `examples` (example i read from files[i], when given).

    Keys [a, b, a, a, c] from files [x, x, y, y, x] -> first [0, 1, 4], copies 2, duplicated 1, {y: 2}.
    """
    seen: dict[Hashable, int] = {}
    first, copies_by_file = [], collections.Counter()
    counts: collections.Counter = collections.Counter()
    for i, example in enumerate(examples):
        k = key(example)
        counts[k] += 1
        if k in seen:
            copies_by_file[files[i] if files else ""] += 1
        else:
            seen[k] = i
            first.append(i)
    return Duplicates(first, len(examples) - len(first), sum(1 for n in counts.values() if n > 1), copies_by_file)


def overlapping(examples: Sequence, key: Key, trained: Sequence) -> list[int]:
    """The indices of `examples` whose key is also the key of one of the `trained` examples."""
    seen = {key(example) for example in trained}
    return [i for i, example in enumerate(examples) if key(example) in seen]


def split_by_key(examples: Sequence, key: Key, held_out: int, seed: int) -> tuple[list[int], list[int]]:
    """(kept indices, held-out indices), each in the original order: about `held_out` examples held out as
    whole groups of equal key, so no key is on both sides.

    The groups are visited in an order shuffled with `seed`; a group joins the held-out side when it
    still fits in `held_out`, so the count is exact unless the groups that would fill it are too large.
    Keys [a, b, a, c], held_out 1 -> (e.g.) kept [0, 1, 2], held out [3]: the two `a` never part.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(key(example), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held: list[int] = []
    for members in order:
        if len(held) + len(members) <= held_out:
            held += members
        if len(held) == held_out:
            break
    chosen = set(held)
    return [i for i in range(len(examples)) if i not in chosen], sorted(held)


def duplicates_summary(name: str, unit: str, total: int, found: Duplicates, kept: bool,
                       file_names: dict[str, str] | None = None) -> str:
    """The load summary's line, e.g. `train: 2025 conversations, 1127 exact duplicates of 127 distinct ones
    (tech_support.yml 1098, ai.yml 4); dropped, the first of each kept (--keep-duplicates keeps them)`.
    `file_names` (file -> how to show it) lists the copies per file; None when one file loaded."""
    line = f"{name}: {total} {unit}{'s' * (total != 1)}, "
    if not found.copies:
        return line + "no exact duplicates"
    line += f"{found.copies} exact duplicate{'s' * (found.copies != 1)} of {found.duplicated} distinct " \
            f"one{'s' * (found.duplicated != 1)}"
    if file_names is not None:
        shown = found.copies_by_file.most_common(5)
        rest = len(found.copies_by_file) - len(shown)
        line += " (" + ", ".join(f"{file_names.get(file, file)} {count}" for file, count in shown) \
                + (f", {rest} more file{'s' * (rest != 1)}" if rest else "") + ")"
    if kept:
        return line + "; kept (--keep-duplicates)"
    return line + "; dropped, the first of each kept (--keep-duplicates keeps them)"

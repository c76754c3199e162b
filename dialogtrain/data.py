"""Read dialogue data (SFT conversations, DPO preference pairs) from files, folders or the hub, and
validate every row before any training starts.

Sources: a `.json`, `.jsonl`, `.csv`, `.parquet`, `.yaml`/`.yml` file; a folder of them (sorted,
recursive, hidden names and other extensions skipped); or a Hugging Face hub id
`name[:config][@split]` when the string is not an existing path.

Where a row is: `FILE line N` for `.jsonl`, `.csv` and `.yaml` (N is the line the row starts on, the
header of a CSV being line 1), `FILE row N` for `.json`, `.parquet` and hub datasets (N counts rows
from 1). A bad row stops the load with a DataError

    "{file} line|row {n} field '{field}': {reason}[: {detail}]"

(`field` is a path into the row, e.g. `response`, `messages[2].content`, `dialog[0]`; indexes count
from 0), unless `skip_bad_rows`, which drops the row and counts its reason in `DataReport.dropped`.
Problems with a whole file (unreadable, malformed JSON/YAML, no rows, unknown format) always stop.
"""

from __future__ import annotations

import codecs
import collections
import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from dialogtrain.errors import UserError

Message = dict[str, str]
Conversation = list[Message]

DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".yaml", ".yml")
LINE_NUMBERED_EXTENSIONS = (".jsonl", ".csv", ".yaml", ".yml")

ROLE_NAMES = {"system": "system", "user": "user", "human": "user",
              "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
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
HUB_ID = re.compile(r"[\w][\w.-]*(/[\w.-]+)?(:[\w.-]+)?(@[\w.:%+\[\]-]+)?")
MAX_NESTING = 100  # lists/objects inside one row; deeper is malformed, not a dialogue
CSV_FIELD_LIMIT = 2**31 - 1  # the csv module refuses fields over 128 KiB by default: a long response is fine

TRAILING_USER_NOTE = "trailing user turn removed"
EMPTY_SYSTEM_NOTE = "empty system message removed"


class DataError(UserError):
    """A data source or row that cannot be used; the message names the file, row and field."""


@dataclass(frozen=True)
class Preference:
    """One DPO pair: `prompt` is an optional system message then alternating turns ending with a user
    turn; `chosen` and `rejected` are the two assistant completions."""

    prompt: list[Message]
    chosen: str
    rejected: str


@dataclass
class DataReport:
    """What a load read, kept, dropped (reason -> count) and normalised (note -> count)."""

    source: str
    files: list[str]
    rows: int
    examples: int
    dropped: collections.Counter = field(default_factory=collections.Counter)
    notes: collections.Counter = field(default_factory=collections.Counter)
    unit: str = "conversation"
    from_hub: bool = False

    def summary(self) -> str:
        """One line, e.g. `data: 120 rows from 2 files -> 40 conversations; dropped 3 (2 empty
        assistant turn, 1 roles out of order); notes: 5 trailing user turn removed`."""
        origin = f"hub dataset {self.source}" if self.from_hub else plural(len(self.files), "file")
        line = f"data: {plural(self.rows, 'row')} from {origin} -> {plural(self.examples, self.unit)}"
        if self.dropped:
            line += f"; dropped {sum(self.dropped.values())} ({count_list(self.dropped)})"
        if self.notes:
            line += f"; notes: {count_list(self.notes)}"
        return line


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def count_list(counts: collections.Counter) -> str:
    return ", ".join(f"{count} {what}" for what, count in counts.most_common())


# ----------------------------------------------------------------------------------------------------
# sources: files, folders, hub ids


def local_data_files(source: str) -> list[Path] | None:
    """The data files `source` names, in load order; None when it is a hub id (not an existing path).

    Raises DataError for a missing path that looks like one, an unsupported file type, or a folder
    without data files."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in DATA_EXTENSIONS:
            raise DataError(f"{source}: unsupported file type; expected one of {', '.join(DATA_EXTENSIONS)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{source}: no data files in this folder ({', '.join(DATA_EXTENSIONS)})")
        return files
    if looks_like_path(source):
        raise DataError(f"{source}: no such file")
    return None


def looks_like_path(source: str) -> bool:
    """Whether a string that is not an existing path was meant as one rather than as a hub id
    (`org/name[:config][@split]`: at most one slash, so `data/train.jsonl`-like strings are paths)."""
    name = source.partition("@")[0].partition(":")[0]
    return (source.startswith((".", "/", "~")) or "\\" in source or name.lower().endswith(DATA_EXTENSIONS)
            or not HUB_ID.fullmatch(source))


def read_rows(source: str) -> Iterator[tuple[str, int, object]]:
    """Every row of `source` as (file, n, row), file by file in load order; `n` is the line number for
    .jsonl/.csv/.yaml and the 1-based row index otherwise. Rows are dicts when the file is well formed;
    JSON rows may be anything (the loaders report non-objects as bad rows). Strings keep bytes that are
    not valid UTF-8 as surrogate escapes, so the loaders can report them per row and field.

    Raises DataError for a missing/unreadable/malformed/empty file or a hub dataset that cannot load."""
    files = local_data_files(source)
    if files is None:
        yield from hub_rows(source)
        return
    for path in files:
        reader = FILE_READERS[path.suffix.lower()]
        count = 0
        for n, row in reader(path):
            count += 1
            yield str(path), n, row
        if count == 0:
            raise DataError(f"{path}: no rows")


def jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    with open_data_file(path, "rb") as handle:
        for n, raw in enumerate(handle, 1):
            line = decode_keeping_bad_bytes(raw.removeprefix(codecs.BOM_UTF8) if n == 1 else raw)
            if not line.strip():
                continue
            yield n, parse_json(line, path, n)


def json_rows(path: Path) -> Iterator[tuple[int, object]]:
    """A list of rows, or an object holding exactly one list (e.g. `{"data": [...]}`)."""
    text = decode_keeping_bad_bytes(read_bytes(path).removeprefix(codecs.BOM_UTF8))
    if not text.strip():
        return
    document = parse_json(text, path)
    if isinstance(document, dict):
        lists = [value for value in document.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows, or an object holding exactly one list; "
                            f"found an object with {len(lists)} lists")
        document = lists[0]
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a list of rows, got {json_type_name(document)}")
    yield from enumerate(document, 1)


def parse_json(text: str, path: Path, line: int | None = None) -> object:
    """json.loads; every failure is a DataError naming `path` and `line` (of a .jsonl file) or the place
    in the file: malformed text, nesting deeper than the parser's recursion, integers past 4300 digits."""
    where = f"{path} line {line}" if line else str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if line:
            raise DataError(f"{where}: malformed JSON: {err.msg} (column {err.colno})") from None
        raise DataError(f"{path} line {err.lineno} column {err.colno}: malformed JSON: {err.msg}") from None
    except RecursionError:
        raise DataError(f"{where}: malformed JSON: nested too deeply") from None
    except ValueError as err:
        raise DataError(f"{where}: malformed JSON: {str(err).split(';')[0]}") from None


def csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Rows keyed by the header, like csv.DictReader: a short row has None for its missing columns,
    the extra values of a long row are a list under the key None."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with open_data_file(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle)
        header: list[str] | None = None
        start = 1
        try:
            for values in reader:
                row_line, start = start, reader.line_num + 1
                if not values:
                    continue
                if header is None:
                    header = values
                    continue
                row: dict = dict(zip(header, values + [None] * (len(header) - len(values))))
                if len(values) > len(header):
                    row[None] = values[len(header):]
                yield row_line, row
        except csv.Error as err:
            raise DataError(f"{path} line {reader.line_num}: malformed CSV: {err}") from None


def yaml_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """chatterbot-corpus YAML: `conversations:` a list of utterance lists, each yielded as
    `{"conversation": [...]}` with the line it starts on. Scalars stay the strings written (no YAML
    typing: `1984` and `yes` are text), so numbers in the corpus arrive as strings."""
    import yaml

    text = decode_strictly(path, read_bytes(path))
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        document = yaml.compose(text, Loader=loader)
    except yaml.YAMLError as err:
        raise DataError(f"{path}: malformed YAML: {err}") from None
    except RecursionError:
        raise DataError(f"{path}: malformed YAML: nested too deeply") from None
    if document is None:
        return
    conversations = yaml_mapping_value(document, "conversations")
    if not isinstance(conversations, yaml.SequenceNode):
        raise DataError(f"{path}: expected chatterbot-corpus YAML: a mapping with `conversations:`, "
                        "a list of utterance lists")
    for node in conversations.value:
        line = node.start_mark.line + 1
        try:
            yield line, {"conversation": yaml_node_value(node)}
        except RecursionError:
            raise DataError(f"{path} line {line}: malformed YAML: nested more than {MAX_NESTING} levels deep, "
                            "or an alias that contains itself") from None


def yaml_mapping_value(node, key: str):
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                return value_node
    return None


def yaml_node_value(node, depth: int = 0, done: dict | None = None) -> object:
    """Plain Python from a composed node, every scalar as the string written; a key that is not a
    scalar becomes its YAML text. An alias is converted once and shared (a "billion laughs" file stays
    small); RecursionError past MAX_NESTING levels, which also ends an alias that contains itself."""
    import yaml

    if depth > MAX_NESTING:
        raise RecursionError
    done = {} if done is None else done
    if id(node) in done:
        return done[id(node)]
    if isinstance(node, yaml.SequenceNode):
        value: object = [yaml_node_value(item, depth + 1, done) for item in node.value]
    elif isinstance(node, yaml.MappingNode):
        value = {(k.value if isinstance(k, yaml.ScalarNode) else yaml.serialize(k).strip()):
                 yaml_node_value(v, depth + 1, done) for k, v in node.value}
    else:
        value = node.value
    done[id(node)] = value
    return value


def parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow
    import pyarrow.parquet

    n = 0
    try:
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except (OSError, pyarrow.ArrowException) as err:
        raise DataError(f"{path}: cannot read Parquet: {err}") from None


FILE_READERS: dict[str, Callable[[Path], Iterator[tuple[int, object]]]] = {
    ".jsonl": jsonl_rows, ".json": json_rows, ".csv": csv_rows, ".parquet": parquet_rows,
    ".yaml": yaml_rows, ".yml": yaml_rows}


def open_data_file(path: Path, mode: str, **kwargs):
    try:
        return open(path, mode, **kwargs)
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None


def read_bytes(path: Path) -> bytes:
    with open_data_file(path, "rb") as handle:
        return handle.read()


def decode_keeping_bad_bytes(raw: bytes) -> str:
    # Invalid bytes become lone surrogates (U+DC80..U+DCFF) that validation reports per row and field.
    return raw.decode("utf-8", errors="surrogateescape")


def decode_strictly(path: Path, raw: bytes) -> str:
    try:
        return raw.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte 0x{raw[err.start]:02x})") from None


def parse_hub_id(source: str) -> tuple[str, str | None, str]:
    """`name[:config][@split]` -> (name, config or None, split, default "train")."""
    name, _, split = source.partition("@")
    name, _, config = name.partition(":")
    return name, config or None, split or "train"


def hub_rows(source: str) -> Iterator[tuple[str, int, object]]:
    name, config, split = parse_hub_id(source)
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # no network, no such dataset, auth, bad split: one message for the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{source}: no such local file or folder, and the Hugging Face hub dataset could "
                        f"not be loaded (no network?): {reason}") from None
    count = 0
    for count, row in enumerate(dataset, 1):
        yield source, count, row
    if count == 0:
        raise DataError(f"{source}: no rows")


def data_fingerprint(source: str) -> str:
    """sha256 hex over each data file's name (relative to `source`) and bytes, in load order, so a
    resumed run can tell that its data changed; for a hub id, the id itself."""
    files = local_data_files(source)
    if files is None:
        return source
    root = Path(source).expanduser()
    digest = hashlib.sha256()
    for path in files:
        name = path.name if path == root else path.relative_to(root).as_posix()
        digest.update(name.encode() + b"\0")
        with open_data_file(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# bad rows and the checks that find them


class BadRow(Exception):
    """One row cannot be used: `reason` is the stable name counted in `DataReport.dropped`."""

    def __init__(self, field: str | None, reason: str, detail: str = ""):
        super().__init__(reason)
        self.field, self.reason, self.detail = field, reason, detail

    def message(self, file: str, n: int) -> str:
        where = f" field '{self.field}'" if self.field else ""
        return f"{row_location(file, n)}{where}: {self.reason}" + (f": {self.detail}" if self.detail else "")


def row_location(file: str, n: int) -> str:
    return f"{file} {'line' if file.lower().endswith(LINE_NUMBERED_EXTENSIONS) else 'row'} {n}"


class Turn(NamedTuple):
    role: str
    content: str
    field: str  # where it came from in the row, for messages


def json_type_name(value: object) -> str:
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
             list: "list", tuple: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


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


# ----------------------------------------------------------------------------------------------------
# row formats: how one row becomes a conversation or a preference pair


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
    if "chosen" not in row and "rejected" not in row:
        return None
    if "question" in row and "chosen" in row:
        return RowFormat("system/question/chosen/rejected", lambda r, notes: parse_orca_row(r))
    if "prompt" in row or isinstance(row.get("chosen"), list):
        return RowFormat("prompt/chosen/rejected", parse_chosen_rejected_row)
    if "chosen" in row:
        return RowFormat("Human/Assistant transcripts", parse_hh_row)
    return None


def checked_preference(prompt: list[Message], chosen: str, rejected: str) -> Preference:
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise BadRow(key, "empty completion")
    if chosen.strip() == rejected.strip():
        raise BadRow("rejected", "chosen == rejected")
    return Preference(prompt=prompt, chosen=chosen, rejected=rejected)


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
    chosen = required(row, "chosen", "chosen")
    if not present(row, "prompt") and not isinstance(chosen, list):
        # Without a prompt, chosen and rejected must be whole conversations: blame chosen, not the prompt.
        raise BadRow("chosen", "wrong type", f"expected a message list (the row has no 'prompt'), "
                                             f"got {json_type_name(chosen)}")
    if isinstance(chosen, list) and (not present(row, "prompt") or len(chosen) > 1):
        return shared_prefix_preference(row, notes)
    turns = prompt_turns(row)
    system = optional_text(row, "system")
    if system.strip():
        if turns and turns[0].role == "system":
            raise BadRow("system", "roles out of order", "a system message in both 'system' and 'prompt'")
        turns.insert(0, Turn("system", system, "system"))
    prompt = prompt_from_turns(turns, "prompt", notes)
    return checked_preference(prompt, completion_text(row, "chosen"), completion_text(row, "rejected"))


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


# ----------------------------------------------------------------------------------------------------
# the loaders


def load_conversations(source: str, skip_bad_rows: bool = False) -> tuple[list[Conversation], DataReport]:
    """Every conversation in `source` (see the module docstring for formats and errors), validated:
    optional system message, then user/assistant alternating, starting with user, ending with
    assistant, no empty turn. Pair rows sharing `conversation_id`/`dialog_id` join in file order."""
    parsed, report = parse_rows(source, skip_bad_rows, detect_conversation_format, "conversation")
    conversations = join_grouped_exchanges(parsed)
    report.examples = len(conversations)
    return conversations, report


def load_preferences(source: str, skip_bad_rows: bool = False) -> tuple[list[Preference], DataReport]:
    """Every preference pair in `source`: prompt/chosen/rejected, orca system/question/chosen/rejected,
    or Anthropic HH transcripts. Empty parts, chosen == rejected and prompts not ending with a user turn
    are bad rows."""
    parsed, report = parse_rows(source, skip_bad_rows, detect_preference_format, "preference pair")
    report.examples = len(parsed)
    return [preference for _, preference in parsed], report


def parse_rows(source: str, skip_bad_rows: bool, detect: Callable[[dict], RowFormat | None],
               unit: str) -> tuple[list[tuple[str | None, object]], DataReport]:
    """(group key, example) for every usable row, and the report; the format of each file is detected
    from its first object row. Raises DataError at the first bad row unless `skip_bad_rows`."""
    files = local_data_files(source)
    report = DataReport(source=source, files=[source] if files is None else [str(path) for path in files],
                        rows=0, examples=0, unit=unit, from_hub=files is None)
    formats: dict[str, RowFormat] = {}
    parsed: list[tuple[str | None, object]] = []
    for file, n, row in read_rows(source):
        report.rows += 1
        notes: collections.Counter = collections.Counter()
        try:
            check_row_shape(row)
            if file not in formats:
                formats[file] = file_format(detect, row, file, n, unit)
            example = formats[file].parse(row, notes)
        except BadRow as bad:
            if not skip_bad_rows:
                raise DataError(bad.message(file, n)) from None
            report.dropped[bad.reason] += 1
            continue
        report.notes.update(notes)
        parsed.append((formats[file].group(row), example))
    if not parsed:
        raise DataError(f"{source}: no usable rows ({plural(report.rows, 'row')} read, all dropped: "
                        f"{count_list(report.dropped)})")
    return parsed, report


def check_row_shape(row: object) -> None:
    if not isinstance(row, dict):
        raise BadRow(None, "wrong type", f"expected an object with fields, got {json_type_name(row)}")
    if None in row:
        raise BadRow(None, "wrong number of columns", "more values than the header has columns")


def file_format(detect: Callable[[dict], RowFormat | None], row: dict, file: str, n: int,
                unit: str) -> RowFormat:
    found = detect(row)
    if found is None:
        fields = ", ".join(repr(key) for key in row) or "none"
        expected = (FORMAT_HELP_CONVERSATIONS if unit == "conversation" else FORMAT_HELP_PREFERENCES)
        raise DataError(f"{row_location(file, n)}: cannot tell the data format from the fields ({fields}); "
                        f"expected {expected}")
    return found


FORMAT_HELP_CONVERSATIONS = ("pairs (" + ", ".join("/".join(pair) for pair in PAIR_COLUMNS)
                             + "), messages or conversations (a message list), or dialog (utterances)")
FORMAT_HELP_PREFERENCES = ("prompt/chosen/rejected, system/question/chosen/rejected, or chosen/rejected "
                           "(message lists or Human/Assistant transcripts)")

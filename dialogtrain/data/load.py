"""Loading a data source into validated conversations, preference pairs or ratings, with a report of the load."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from dialogtrain.data.formats import (
    FORMAT_HELP_CONVERSATIONS,
    FORMAT_HELP_PREFERENCES,
    FORMAT_HELP_RATINGS,
    RowFormat,
    detect_conversation_format,
    detect_preference_format,
    detect_rating_format,
    join_grouped_exchanges,
)
from dialogtrain.data.rows import BadRow, Conversation, Preference, Rating
from dialogtrain.data.sources import DataError, json_type_name, local_data_files, read_rows, row_location


@dataclass
class DataReport:
    """What a load read, kept, dropped (reason -> count) and normalised (note -> count); the file each
    example came from (`origins`, in example order), each file's detected format, the first bad rows."""

    source: str
    files: list[str]
    rows: int
    examples: int
    dropped: collections.Counter = field(default_factory=collections.Counter)
    notes: collections.Counter = field(default_factory=collections.Counter)
    unit: str = "conversation"
    from_hub: bool = False
    origins: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    bad_rows: list[str] = field(default_factory=list)  # the messages of the first MAX_BAD_ROWS dropped rows

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


MAX_BAD_ROWS = 5


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def count_list(counts: collections.Counter) -> str:
    return ", ".join(f"{count} {what}" for what, count in counts.most_common())


def load_conversations(source: str, skip_bad_rows: bool = False) -> tuple[list[Conversation], DataReport]:
    """Every conversation in `source` (see the module docstring for formats and errors), validated:
    optional system message, then user/assistant alternating, starting with user, ending with
    assistant, no empty turn. Pair rows sharing `conversation_id`/`dialog_id` join in file order."""
    parsed, report = parse_rows(source, skip_bad_rows, detect_conversation_format, "conversation")
    conversations = join_grouped_exchanges(parsed)
    report.examples = len(conversations)
    report.origins = joined_origins(parsed, report.origins)
    return conversations, report


def joined_origins(parsed: list[tuple[str | None, object]], files: list[str]) -> list[str]:
    """The file of each conversation join_grouped_exchanges makes from `parsed` (rows read from `files`):
    that of its first row."""
    seen, origins = set(), []
    for (group, _), file in zip(parsed, files, strict=True):
        if group is None or group not in seen:
            origins.append(file)
            seen.add(group)
    return origins


def load_preferences(source: str, skip_bad_rows: bool = False) -> tuple[list[Preference], DataReport]:
    """Every preference pair in `source`: prompt/chosen/rejected, orca system/question/chosen/rejected,
    or Anthropic HH transcripts. Empty parts, chosen == rejected and prompts not ending with a user turn
    are bad rows."""
    parsed, report = parse_rows(source, skip_bad_rows, detect_preference_format, "preference pair")
    report.examples = len(parsed)
    return [preference for _, preference in parsed], report


def load_ratings(source: str, skip_bad_rows: bool = False) -> tuple[list[Rating], DataReport]:
    """Every rated completion in `source` (KTO): prompt (or messages)/completion/label rows, and preference
    pairs, each giving its chosen (desirable) and rejected (undesirable) completion; a file may mix both."""
    parsed, report = parse_rows(source, skip_bad_rows, detect_rating_format, "rated completion")
    ratings = [(rating, file) for (_, row_ratings), file in zip(parsed, report.origins or [None] * len(parsed),
                                                                strict=True) for rating in row_ratings]
    report.examples = len(ratings)
    report.origins = [file for _, file in ratings] if report.origins else []
    return [rating for rating, _ in ratings], report


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
            if len(report.bad_rows) < MAX_BAD_ROWS:
                report.bad_rows.append(bad.message(file, n))
            continue
        report.notes.update(notes)
        parsed.append((formats[file].group(row), example))
        report.origins.append(file)
    report.formats = {file: found.name for file, found in formats.items()}
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
        expected = {"conversation": FORMAT_HELP_CONVERSATIONS, "rated completion": FORMAT_HELP_RATINGS}.get(
            unit, FORMAT_HELP_PREFERENCES)
        raise DataError(f"{row_location(file, n)}: cannot tell the data format from the fields ({fields}); "
                        f"expected {expected}")
    return found



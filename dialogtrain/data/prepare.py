"""The train and eval sets of a run: sources loaded, duplicates and train/eval overlap dropped, encoded.

    --data sources (data.mixture) -> load each (kind.load) -> exact duplicates across all of them
    dropped, the first of each kept (data.dedup; --keep-duplicates keeps them) -> the eval set:
    --eval-data (its own duplicates dropped, then what also occurs in training left out unless
    --keep-overlap) or --eval-split (whole groups of equal overlap key held out of the training set, so
    no conversation, or for pairs no prompt, is on both sides) -> encoded source by source.

Every encoded example dict gains "source", the name of the source it came from: a mixture's draw
(data.mixture.EpochDraw) and the per-source eval metrics read it. The recipes call prepare_examples;
`dialogtrain inspect` calls select_examples and encodes on its own. Torch-free.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from dialogtrain.data.dedup import (
    Key,
    conversation_key,
    duplicates_summary,
    find_duplicates,
    normalised,
    overlapping,
    preference_key,
    prompt_key,
    split_by_key,
)
from dialogtrain.data.encode import EncodeStats, encode_conversations, encode_preferences, encode_ratings
from dialogtrain.data.formats import (
    RowFormat,
    detect_conversation_format,
    detect_preference_format,
    detect_rating_format,
)
from dialogtrain.data.load import DataReport, load_conversations, load_preferences, load_ratings, plural
from dialogtrain.data.mixture import EpochDraw, MixtureError, Source, parse_sources
from dialogtrain.data.sources import DataError, read_rows
from dialogtrain.errors import UserError


@dataclass(frozen=True)
class ExampleKind:
    """One kind of training data: how it loads and encodes, when two examples are the same
    (`duplicate_key`), and when an eval example was seen in training (`overlap_key`, on its `overlap_part`)."""

    unit: str  # "conversation", "preference pair"
    load: Callable[[str, bool], tuple[list, DataReport]]
    encode: Callable[[Any, list, int], tuple[list[dict], EncodeStats]]
    detect: Callable[[dict], RowFormat | None]  # the format of a row of this kind; None: not this kind
    duplicate_key: Key
    overlap_key: Key
    overlap_part: str  # what overlap_key looks at: the whole "conversation", or the "prompt"
    nothing_to_learn: str  # why an encoded set can be empty
    also_reads: tuple = ()  # other kinds whose files this kind loads too (ratings read preference pairs)


CONVERSATIONS = ExampleKind("conversation", load_conversations, encode_conversations, detect_conversation_format,
                            conversation_key, conversation_key, "conversation",
                            "no example has a learnable assistant token")
PREFERENCES = ExampleKind("preference pair", load_preferences, encode_preferences, detect_preference_format,
                          preference_key, prompt_key, "prompt",
                          "no preference pair has a learnable token on both sides")
RATINGS = ExampleKind("rated completion", load_ratings, encode_ratings, detect_rating_format,
                      lambda rating: (conversation_key(rating.prompt), normalised(rating.completion), rating.desirable),
                      prompt_key, "prompt", "no rated completion has a learnable token", also_reads=(PREFERENCES,))
KINDS = (CONVERSATIONS, PREFERENCES, RATINGS)


class Loaded(NamedTuple):
    """One example before tokenizing, with the name of its source and the file it was read from."""

    source: str
    example: Any
    file: str


@dataclass
class Selection:
    """What a run trains and evaluates on, before tokenizing, and what was found on the way."""

    train: list[Loaded]
    eval: list[Loaded]
    reports: list[tuple[str, Source, DataReport]]  # ("train" or "eval", source, its load report)
    lines: list[str]  # the duplicate, overlap and split lines of the load summary


def prepare_examples(options, kind: ExampleKind, tokenizer, show: Callable[[str], None]
                     ) -> tuple[list[dict], list[dict]]:
    """(train set, eval set) of the run `options` (RunOptions), encoded and tagged with their source; the
    load summary goes to `show`, line by line. Raises UserError for bad data or an empty set."""
    selection = select_examples(options.data, kind, options.schedule.seed)
    sets = [name for name, _, _ in selection.reports]
    several = sets.count("train") > 1 or sets.count("eval") > 1
    for name, source, report in selection.reports:
        show(f"{name} {f'[{source.name}] ' if several else ''}{report.summary()}")
    for line in selection.lines:
        show(line)
    encoded = []
    for name, loaded, flag in (("train", selection.train, "--data"), ("eval", selection.eval, "--eval-data")):
        if not loaded:
            encoded.append([])
            continue
        examples, stats = encode_examples(loaded, kind, tokenizer, options.data.max_length)
        show(f"{name} {stats.summary()}")
        if not examples:
            raise UserError(f"{flag} {options.data.data if name == 'train' else options.data.eval_data}: "
                            f"{kind.nothing_to_learn}")
        encoded.append(examples)
    train, eval_set = encoded
    try:
        summary = EpochDraw.of(options.data.data, [e["source"] for e in train], options.schedule.seed).summary()
    except MixtureError as err:
        raise UserError(f"--data {options.data.data}: {err}") from None
    if summary:
        show(f"train {summary}")
    return train, eval_set


def select_examples(data, kind: ExampleKind, seed: int) -> Selection:
    """The train and eval examples `data` (DataOptions) names, as the module docstring says; `seed` makes
    --eval-split's choice. Raises UserError (DataError) for bad data and impossible splits."""
    reports: list[tuple[str, Source, DataReport]] = []
    lines: list[str] = []
    train = load_set("train", "--data", data.data, kind, data.skip_bad_rows, reports)
    train = without_duplicates("train", train, kind, data.keep_duplicates, reports, lines)
    eval_set: list[Loaded] = []
    if data.eval_data:
        eval_set = load_set("eval", "--eval-data", data.eval_data, kind, data.skip_bad_rows, reports)
        eval_set = without_duplicates("eval", eval_set, kind, data.keep_duplicates, reports, lines)
        eval_set, line = without_overlap(eval_set, train, kind, data.keep_overlap)
        lines.append(line)
    elif data.eval_split:
        train, eval_set, line = split_eval(train, kind, data.eval_split, seed)
        lines.append(line)
    return Selection(train, eval_set, reports, lines)


def load_set(name: str, flag: str, value: str, kind: ExampleKind, skip_bad_rows: bool,
             reports: list[tuple[str, Source, DataReport]]) -> list[Loaded]:
    """Every example of every source of `value` (a --data or --eval-data value), source after source; each
    load's report is appended to `reports`."""
    try:
        sources = parse_sources(value)
    except MixtureError as err:
        raise UserError(f"{flag} {err}") from None
    loaded: list[Loaded] = []
    for source in sources:
        try:
            examples, report = kind.load(source.location, skip_bad_rows)
        except DataError as err:
            raise wrong_kind(source.location, kind, len(sources) > 1) or err from None
        reports.append((name, source, report))
        loaded += [Loaded(source.name, example, file)
                   for example, file in zip(examples, report.origins, strict=True)]
    return loaded


def kind_of_source(location: str) -> ExampleKind | None:
    """The kind of data the first row of `location` is (KINDS in order), or None. Reads one row."""
    try:
        _, _, row = next(read_rows(location))
    except (DataError, StopIteration):
        return None
    if not isinstance(row, dict):
        return None
    return next((kind for kind in KINDS if kind.detect(row) is not None), None)


def wrong_kind(location: str, kind: ExampleKind, mixture: bool) -> DataError | None:
    """A clearer error than "cannot tell the data format" when `location` holds another kind of data."""
    found = kind_of_source(location)
    if found is None or found is kind or kind.detect is found.detect or found in kind.also_reads:
        return None
    mixing = "; SFT and preference sources cannot be mixed" if mixture else ""
    return DataError(f"{location}: holds {found.unit}s, this command trains on {kind.unit}s{mixing}")


def without_duplicates(name: str, loaded: list[Loaded], kind: ExampleKind, keep: bool,
                       reports: list[tuple[str, Source, DataReport]], lines: list[str]) -> list[Loaded]:
    """The examples of set `name` with exact duplicates dropped (the first kept) unless `keep`; the summary
    line, with the copies per file when several files loaded, is appended to `lines`."""
    files = display_names([report for set_name, _, report in reports if set_name == name])
    found = find_duplicates([item.example for item in loaded], kind.duplicate_key, [item.file for item in loaded])
    lines.append(duplicates_summary(name, kind.unit, len(loaded), found, keep, files if len(files) > 1 else None))
    return loaded if keep else [loaded[i] for i in found.first]


def display_names(reports: list[DataReport]) -> dict[str, str]:
    """file -> how the load summary shows it: its path inside a folder source, else its name."""
    names = {}
    for report in reports:
        root = Path(report.source).expanduser()
        for file in report.files:
            names[file] = Path(file).relative_to(root).as_posix() if root.is_dir() else Path(file).name
    return names


def without_overlap(eval_set: list[Loaded], train: list[Loaded], kind: ExampleKind,
                    keep: bool) -> tuple[list[Loaded], str]:
    """(the eval examples evaluated, the summary line): those whose overlap key occurs in training are left
    out unless `keep`. All of them overlapping, and left out, is a UserError."""
    seen = overlapping([item.example for item in eval_set], kind.overlap_key, [item.example for item in train])
    if not seen:
        return eval_set, f"eval: no {kind.overlap_part} of --eval-data occurs in --data"
    one = len(seen) == 1
    what = (("also occurs" if one else "also occur") if kind.overlap_part == kind.unit
            else f"{'has' if one else 'have'} a {kind.overlap_part} that also occurs")
    line = f"eval: {len(seen)} of {plural(len(eval_set), kind.unit)} {what} in --data"
    if keep:
        return eval_set, line + "; evaluated all the same (--keep-overlap)"
    if len(seen) == len(eval_set):
        raise UserError(f"{line}: nothing of --eval-data is held out. Evaluate on other data, use --eval-split, "
                        "or add --keep-overlap to evaluate on them anyway")
    left_out = set(seen)
    return ([item for i, item in enumerate(eval_set) if i not in left_out],
            line + "; left out of evaluation (--keep-overlap keeps them)")


def split_eval(train: list[Loaded], kind: ExampleKind, fraction: float, seed: int
               ) -> tuple[list[Loaded], list[Loaded], str]:
    """(train, eval, the summary line): round(fraction x len(train)) examples held out, in whole groups of
    equal overlap key (data.dedup.split_by_key), so none shares its key with a training example."""
    count = min(max(round(fraction * len(train)), 1), len(train) - 1)
    if count < 1:
        raise UserError(f"--eval-split {fraction}: --data has {plural(len(train), kind.unit)}, too few to split")
    kept, held = split_by_key([item.example for item in train], kind.overlap_key, count, seed)
    if not held:
        raise UserError(f"--eval-split {fraction}: every group of {kind.unit}s sharing a {kind.overlap_part} is "
                        f"larger than the {count} to hold out")
    line = (f"eval: --eval-split {fraction:g} holds out {len(held)} of {plural(len(train), kind.unit)} (--seed {seed}); "
            f"no {kind.overlap_part} is shared with training")
    return [train[i] for i in kept], [train[i] for i in held], line


def encode_examples(loaded: list[Loaded], kind: ExampleKind, tokenizer, max_length: int
                    ) -> tuple[list[dict], EncodeStats]:
    """kind.encode, source by source (it drops examples with nothing to learn, so tags are added after), each
    example tagged with "source"; the counts summed over the sources."""
    examples, total = [], EncodeStats()
    for name, run in itertools.groupby(loaded, key=lambda item: item.source):
        encoded, stats = kind.encode(tokenizer, [item.example for item in run], max_length)
        examples += [{**example, "source": name} for example in encoded]
        for counter in dataclasses.fields(EncodeStats):
            setattr(total, counter.name, getattr(total, counter.name) + getattr(stats, counter.name))
    return examples, total

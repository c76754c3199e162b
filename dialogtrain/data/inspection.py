"""`dialogtrain inspect`: what training would see of a data set, before any GPU time, as a text report.

    kind (--kind, or the first row's format) -> the load of every source: rows, formats, bad rows
    -> duplicates, train/eval overlap or the split (data.prepare.select_examples, as training does)
    -> with the model's tokenizer: token-length percentiles of the whole examples, how many lose turns
       or get cut at --max-length, the share of tokens learned -> K examples as rendered, the learned
       tokens marked: [[in double brackets]], or green on a terminal.

Percentiles are nearest-rank: p50 of lengths [3, 5, 9, 12] is 5 (the ceil(0.5 x 4) = 2nd smallest).
dialogtrain's code here imports no torch; transformers imports it while loading a tokenizer.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path

from dialogtrain.data.encode import IGNORE_INDEX, EncodeStats
from dialogtrain.data.load import plural
from dialogtrain.data.mixture import EpochDraw, parse_sources
from dialogtrain.data.prepare import (
    CONVERSATIONS,
    PREFERENCES,
    RATINGS,
    ExampleKind,
    Loaded,
    kind_of_source,
    select_examples,
)
from dialogtrain.data.templates import uses_chat_template
from dialogtrain.errors import UserError

KIND_NAMES = {"sft": CONVERSATIONS, "preference": PREFERENCES, "rating": RATINGS}
PERCENTILES = (50, 90, 95, 99)
UNLIMITED = 10**9  # a --max-length no example reaches: the whole example
LEARNED = {False: ("[[", "]]"), True: ("\x1b[1;32m", "\x1b[0m")}  # (start, end) of a learned run: brackets, colour


def inspect_data(options, kind_name: str = "auto", show: int = 1, colour: bool = False) -> str:
    """The report on the data of `options` (RunOptions: model, data and the data flags, seed), for the
    kind named `kind_name` (auto, sft, preference). Raises UserError for bad input."""
    kind = chosen_kind(kind_name, options.data.data)
    # Every bad row is counted and shown, whether or not training would stop at the first.
    selection = select_examples(dataclasses.replace(options.data, skip_bad_rows=True), kind, options.schedule.seed)
    lines = [f"kind: {kind.unit}s ({'--kind ' + kind_name if kind_name != 'auto' else 'from the first row'})"]
    for name, source, report in selection.reports:
        lines.append(f"{name} [{source.name}] {report.summary()}")
        formats = collections.Counter(report.formats.values())
        lines.append("  formats: " + ", ".join(f"{fmt} ({plural(count, 'file')})" for fmt, count in formats.items()))
        if report.dropped:
            stop = "dropped (--skip-bad-rows)" if options.data.skip_bad_rows else \
                "training stops at the first of them unless --skip-bad-rows"
            lines.append(f"  bad rows: {sum(report.dropped.values())}; {stop}; the first:")
            lines += [f"    {message}" for message in report.bad_rows]
    lines += selection.lines

    from dialogtrain.train.model import load_tokenizer

    tokenizer = load_tokenizer(options.model.model, options.model.trust_remote_code, options.model.chat_template)
    rendering = "its chat template" if uses_chat_template(tokenizer) else "DialoGPT style, each turn + EOS"
    lines.append(f"tokens ({options.model.model}, {rendering}):")
    shown = []
    for name, loaded in (("train", selection.train), ("eval", selection.eval)):
        if loaded:
            examples, report = token_report(name, loaded, kind, tokenizer, options.data.max_length)
            lines += report
            shown += [(name, item, example) for item, example in zip(loaded, examples, strict=True) if example]
    trained = [item.source for name, item, _ in shown if name == "train"]
    draw = EpochDraw.of(options.data.data, trained, options.schedule.seed).summary() if trained else ""
    lines += [f"train {draw}"] if draw else []
    marks = "in colour" if colour else "[[in double brackets]]"
    for k, (name, item, example) in enumerate(shown[:show], 1):
        lines.append(f"example {k} of {len(shown)} ({name}, {Path(item.file).name}; learned tokens {marks}):")
        for ids_key, labels_key in sequence_keys(example):
            title = ids_key.removesuffix("_ids")
            if title != "input":
                lines.append(f"  {title}:")
            text = marked_text(tokenizer, example[ids_key], example[labels_key], colour).rstrip("\n")
            lines += ["    " + line for line in text.split("\n")]
    return "\n".join(lines)


def chosen_kind(name: str, data: str) -> ExampleKind:
    """--kind: a KIND_NAMES key, or auto (the kind of the first row of the first source; conversations when
    it cannot tell, so the load names the problem)."""
    if name == "auto":
        return kind_of_source(parse_sources(data)[0].location) or CONVERSATIONS
    if name not in KIND_NAMES:
        raise UserError(f"--kind must be auto or one of {', '.join(KIND_NAMES)}, got {name!r}")
    return KIND_NAMES[name]


def token_report(name: str, loaded: list[Loaded], kind: ExampleKind, tokenizer, max_length: int
                 ) -> tuple[list[dict | None], list[str]]:
    """(each example as training encodes it, or None when nothing is left to learn; the report lines):
    whole lengths and their percentiles, what --max-length cuts, the share of tokens learned."""
    lengths, encoded, stats = [], [], EncodeStats()
    for item in loaded:
        whole, whole_stats = kind.encode(tokenizer, [item.example], UNLIMITED)
        length = max((sequence_length(e) for e in whole), default=0)
        lengths.append(length)
        examples, example_stats = (whole, whole_stats) if length <= max_length else \
            kind.encode(tokenizer, [item.example], max_length)
        encoded.append(examples[0] if examples else None)
        for counter in ("examples", "history_truncated", "response_truncated", "skipped"):
            setattr(stats, counter, getattr(stats, counter) + getattr(example_stats, counter))
    ordered = sorted(lengths)
    spread = ", ".join(f"p{p} {percentile(ordered, p)}" for p in PERCENTILES)
    tokens = sum(token_count(e) for e in encoded if e)
    learned = sum(learned_count(e) for e in encoded if e)
    cut = sum(1 for length in lengths if length > max_length)
    lines = [f"  {name}, {plural(len(loaded), kind.unit)}: length {spread}, max {ordered[-1]} tokens",
             f"    at --max-length {max_length}: {cut} longer ({stats.history_truncated} lose turns or prompt tokens, "
             f"{stats.response_truncated} get a response cut), {stats.skipped} with nothing to learn",
             f"    learned: {100 * learned / max(tokens, 1):.1f}% of the tokens ({learned} of {tokens})"]
    return encoded, lines


def percentile(ordered: list[int], p: float) -> int:
    """Nearest rank: the ceil(p/100 x n)-th smallest of the sorted values."""
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def sequence_keys(example: dict) -> list[tuple[str, str]]:
    """(ids key, labels key) of each sequence: SFT ("input_ids", "labels"); pairs chosen_* and rejected_*."""
    return [(key, key.removesuffix("ids") + "labels" if key != "input_ids" else "labels")
            for key in example if key.endswith("ids")]


def sequence_length(example: dict) -> int:
    return max(len(example[ids]) for ids, _ in sequence_keys(example))


def token_count(example: dict) -> int:
    return sum(len(example[ids]) for ids, _ in sequence_keys(example))


def learned_count(example: dict) -> int:
    return sum(1 for _, labels in sequence_keys(example) for label in example[labels] if label != IGNORE_INDEX)


def marked_text(tokenizer, ids: list[int], labels: list[int], colour: bool) -> str:
    """The decoded sequence, each run of learned tokens marked (LEARNED). Special tokens are shown.

    ids [h, i, E, o, k, E] with labels [-100, -100, -100, o, k, E] -> "hi<eos>[[ok<eos>]]".
    """
    start, end = LEARNED[colour]
    text, run, learning = [], [], False
    for token, label in [*zip(ids, labels, strict=True), (None, None)]:
        is_learned = label is not None and label != IGNORE_INDEX
        if token is None or (run and is_learned != learning):
            piece = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            text.append(f"{start}{piece}{end}" if learning else piece)
            run = []
        run.append(token)
        learning = is_learned
    return "".join(text)

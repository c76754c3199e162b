"""Reading data sources: files, folders and hub ids, as raw rows with where each row came from.

Sources: a `.json`, `.jsonl`, `.csv`, `.parquet`, `.yaml`/`.yml` file; a folder of them (sorted,
recursive, hidden names and other extensions skipped); or a Hugging Face hub id
`name[:config][@split]` when the string is not an existing path.

Where a row is: `FILE line N` for `.jsonl`, `.csv` and `.yaml` (N is the line the row starts on, the
header of a CSV being line 1), `FILE row N` for `.json`, `.parquet` and hub datasets (N counts rows
from 1). Problems with a whole file (unreadable, malformed JSON/YAML, no rows) are a DataError.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from dialogtrain.errors import UserError

DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".yaml", ".yml")
LINE_NUMBERED_EXTENSIONS = (".jsonl", ".csv", ".yaml", ".yml")
HUB_ID = re.compile(r"[\w][\w.-]*(/[\w.-]+)?(:[\w.-]+)?(@[\w.:%+\[\]-]+)?")
MAX_NESTING = 100  # lists/objects inside one row; deeper is malformed, not a dialogue
CSV_FIELD_LIMIT = 2**31 - 1  # the csv module refuses fields over 128 KiB by default: a long response is fine


class DataError(UserError):
    """A data source or row that cannot be used; the message names the file, row and field."""


def row_location(file: str, n: int) -> str:
    """`FILE line N` or `FILE row N`, as the module docstring says."""
    return f"{file} {'line' if file.lower().endswith(LINE_NUMBERED_EXTENSIONS) else 'row'} {n}"


def json_type_name(value: object) -> str:
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
             list: "list", tuple: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


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


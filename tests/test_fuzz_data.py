"""Malformed data, fuzzed with hypothesis: every format and file type, for load_conversations and
load_preferences. Whatever the bytes, a load either succeeds or raises DataError (a UserError: exit 2)
whose message names the file, and the row and field where one row is to blame; never another exception.

Three properties, each run for FUZZ_EXAMPLES examples (MAX_EXAMPLES below; the counts are printed):
- a valid file with one row broken (a required field missing, of another type, empty, roles out of
  order, bytes that are not UTF-8, a huge value, deep nesting): DataError naming file, row and field;
- a valid file cut short at any byte, or with any bytes spliced in: no exception but DataError;
- arbitrary bytes under every extension, and the empty and BOM-only file.
Then a few through the real command line: exit code 2 and no traceback.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dialogtrain.data.load import load_conversations, load_preferences
from dialogtrain.data.sources import DataError
from dialogtrain.errors import UserError
from tests.checkpoint_helpers import FIXED_PEAK

MAX_EXAMPLES = 300
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RAN: dict[str, int] = {}

# One valid row per format: (loader, row, required fields). Rows are built from words, so a CSV holds
# them on one line each.
CONVERSATION_ROWS = {
    "query/response": {"query": "hello there", "response": "hi how are you"},
    "prompt/response": {"prompt": "what is your name", "response": "my name is bot"},
    "question/answer": {"question": "who are you", "answer": "a bot"},
    "user/assistant": {"user": "good bye", "assistant": "see you later"},
    "instruction/output": {"instruction": "tell me a joke", "input": "about roads", "output": "why did the chicken"},
    "input/output": {"input": "the quick brown fox", "output": "jumps over the lazy dog"},
    "messages": {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    "dialog": {"dialog": ["hi", "hello", "how are you", "fine"]},
}
PREFERENCE_ROWS = {
    "prompt/chosen/rejected": {"prompt": "hello there", "chosen": "hi how are you", "rejected": "go away"},
    "message lists": {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                      "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]},
    "orca": {"system": "", "question": "what is your name", "chosen": "my name is bot", "rejected": "none of yours"},
    "hh": {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
}
FORMATS = {**{("sft", name): row for name, row in CONVERSATION_ROWS.items()},
           **{("dpo", name): row for name, row in PREFERENCE_ROWS.items()}}
LOADERS = {"sft": load_conversations, "dpo": load_preferences}
REQUIRED = {"query/response": ["query", "response"], "prompt/response": ["response"], "question/answer": ["answer"],
            "user/assistant": ["assistant"], "instruction/output": ["output"], "input/output": ["output"],
            "messages": ["messages"], "sharegpt": ["conversations"], "dialog": ["dialog"],
            "prompt/chosen/rejected": ["chosen", "rejected", "prompt"], "message lists": ["chosen", "rejected"],
            "orca": ["question", "chosen", "rejected"], "hh": ["chosen", "rejected"]}
FLAT = {name for name, row in {**CONVERSATION_ROWS, **PREFERENCE_ROWS}.items()
        if all(isinstance(v, str) for v in row.values())}
NOT_UTF8 = "\udcff\udcfe"  # written as the bytes ff fe (surrogateescape)
# Values written as raw text in place of a marker string (json/jsonl/yaml): what json.dumps and yaml.dump
# cannot produce. Deep nesting, a 5000-digit number, NaN, a YAML alias containing itself, a list as a key.
RAW = {"json": ["[" * 3000 + '"x"' + "]" * 3000, "1" * 5000, "NaN", "-Infinity", '{"a": ' * 2000 + "1" + "}" * 2000],
       "yaml": ["[" * 3000 + "x" + "]" * 3000, "&a [*a]", "{[a, b]: c}", "!!binary x", "*nowhere"]}
RAW["jsonl"] = RAW["json"]

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=5), children, max_size=3), max_leaves=8)


def counted(name: str) -> None:
    RAN[name] = RAN.get(name, 0) + 1


def encode(rows: list, extension: str) -> bytes:
    """Rows as a file of `extension` (json, jsonl, csv, parquet, yaml); strings keep surrogate escapes, and
    a string "__RAW_i__" becomes the raw text RAW[extension][i]."""
    data = encode_plain(rows, extension)
    for i, fragment in enumerate(RAW.get(extension, [])):
        quoted = f'"__RAW_{i}__"' if extension in ("json", "jsonl") else f"__RAW_{i}__"
        data = data.replace(quoted.encode(), fragment.encode())
    return data


def encode_plain(rows: list, extension: str) -> bytes:
    if extension == "jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    elif extension == "json":
        text = json.dumps({"data": rows}, ensure_ascii=False, indent=1)
    elif extension == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        header = list(dict.fromkeys(key for row in rows for key in row))
        writer.writerow(header)
        writer.writerows([["" if row.get(k) is None else str(row.get(k)) for k in header] for row in rows])
        text = out.getvalue()
    elif extension == "yaml":
        import yaml

        text = yaml.safe_dump({"conversations": [row.get("dialog") for row in rows]}, allow_unicode=True)
    else:
        import pyarrow
        import pyarrow.parquet

        sink = io.BytesIO()
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), sink)
        return sink.getvalue()
    return text.encode("utf-8", "surrogateescape")


def extensions_for(name: str) -> list[str]:
    return ["jsonl", "json", "parquet"] + (["csv"] if name in FLAT else []) + (["yaml"] if name == "dialog" else [])


def load(command: str, path: Path):
    """The loader's result, or the DataError it raised; any other exception fails the test."""
    try:
        return LOADERS[command](str(path))
    except DataError as err:
        message = str(err)
        message.encode("utf-8")  # printable: bytes that are not UTF-8 are shown escaped, never raw
        return err


@st.composite
def broken_files(draw):
    """(command, format, extension, rows, index of the broken row, field to blame or None, how, whether the
    row is certainly invalid now)."""
    command, name = draw(st.sampled_from(sorted(FORMATS)))
    extension = draw(st.sampled_from(extensions_for(name)))
    rows = [json.loads(json.dumps(FORMATS[command, name])) for _ in range(draw(st.integers(2, 4)))]
    index = draw(st.integers(1, len(rows) - 1))  # the first row is valid: it decides the format
    row = rows[index]
    key = draw(st.sampled_from(REQUIRED[name]))
    how = draw(st.sampled_from(["missing", "wrong type", "empty", "not UTF-8", "roles out of order", "huge",
                                "deep", "raw"]))
    blame, invalid = key, extension != "csv" or how in ("missing", "empty", "not UTF-8")
    if how == "missing":
        del row[key]
    elif how == "wrong type":
        row[key] = draw(json_values.filter(lambda v: not isinstance(v, (str, list))))
    elif how == "empty":
        row[key] = draw(st.sampled_from(["", "   ", "\n"])) if isinstance(row[key], str) else []
    elif how == "not UTF-8":
        if isinstance(row[key], str):
            row[key] += NOT_UTF8
        else:
            item = row[key][-1]
            if isinstance(item, dict):
                item["content" if "content" in item else "value"] += NOT_UTF8
            else:
                row[key][-1] = item + NOT_UTF8
            blame = None  # the field is an element of the list: messages[1].content, dialog[3], ...
    elif how == "roles out of order":
        if isinstance(row[key], list):
            row[key] = list(reversed(row[key]))
        invalid, blame = isinstance(row[key], list) and name != "dialog", None  # dialog roles come from positions
    elif how == "huge":
        row[key] = draw(json_values) if draw(st.booleans()) else ["x" * 300_000]
        invalid = False
    elif how == "deep":
        nested: object = "x"
        for _ in range(draw(st.integers(110, 150 if extension == "yaml" else 900))):
            nested = [nested]
        row[key] = nested
    else:
        extension = "jsonl" if extension in ("csv", "parquet") else extension
        row[key] = f"__RAW_{draw(st.integers(0, len(RAW[extension]) - 1))}__"
        invalid = True
    if extension == "csv" and how in ("huge", "deep", "wrong type"):
        row[key] = str(row[key])[:400_000]  # CSV holds text only: a list or number is just its text
    if extension == "parquet":
        try:
            encode(rows, extension)
        except Exception:  # pyarrow cannot store mixed or too deeply nested columns: try JSON instead
            extension = "jsonl"
    return command, name, extension, rows, index, blame, how, invalid


@FUZZ
@given(case=broken_files())
def test_a_broken_row_is_a_data_error_naming_file_row_and_field(case):
    command, name, extension, rows, index, blame, how, invalid = case
    counted("broken rows")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data.{extension}"
        path.write_bytes(encode(rows, extension))
        result = load(command, path)
    if not isinstance(result, DataError):
        # Only a mutation that may keep the row valid: a huge value that is still a string, the text of a
        # number or list in a CSV cell, reversed dialog lines.
        assert not invalid, (name, extension, how, rows[index])
        return
    message = str(result)
    assert str(path) in message, message
    if extension in ("jsonl", "json", "parquet") and "malformed JSON" not in message:
        unit = "line" if extension == "jsonl" else "row"
        assert re.search(rf" {unit} {index + 1}\b", message), (message, index)
        if blame and "field" in message:
            assert f"field '{blame}" in message, (message, blame)


@st.composite
def damaged_files(draw):
    command, name = draw(st.sampled_from(sorted(FORMATS)))
    extension = draw(st.sampled_from(extensions_for(name)))
    data = encode([FORMATS[command, name]] * 3, extension)
    cut = draw(st.integers(0, len(data)))
    splice = draw(st.binary(max_size=12))
    at = draw(st.integers(0, cut))
    return command, extension, data[:at] + splice + data[at:cut]


@FUZZ
@given(case=damaged_files())
def test_a_truncated_or_spliced_file_never_raises_anything_but_a_data_error(case):
    command, extension, content = case
    counted("damaged files")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data.{extension}"
        path.write_bytes(content)
        result = load(command, path)
    if isinstance(result, DataError):
        assert str(path) in str(result)


@FUZZ
@given(command=st.sampled_from(["sft", "dpo"]), extension=st.sampled_from(["jsonl", "json", "csv", "parquet", "yaml",
                                                                          "yml"]),
       content=st.one_of(st.binary(max_size=200), st.sampled_from([b"", b"\xef\xbb\xbf", b"\n\n", b"null", b"[]",
                                                                   b"{}", b"1" * 5000, b"[" * 5000, b"- " * 5000])))
def test_arbitrary_bytes_under_every_extension(command, extension, content):
    counted("arbitrary bytes")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data.{extension}"
        path.write_bytes(content)
        result = load(command, path)
    if isinstance(result, DataError):
        assert str(path) in str(result)
    else:
        assert result[0], "a load that succeeds has examples"


def test_the_fuzzing_ran_its_examples(capsys):
    """Runs after the three properties (file order): how many cases each tried."""
    ran = {name: RAN.get(name, 0) for name in ("broken rows", "damaged files", "arbitrary bytes")}
    if not all(ran.values()):
        pytest.skip("the fuzz properties did not all run in this session")
    with capsys.disabled():
        print(f"\nfuzz cases run: {ran} (max_examples={MAX_EXAMPLES} each)")
    assert all(count >= MAX_EXAMPLES for count in ran.values()), ran


def test_known_hard_cases_are_data_errors(tmp_path):
    """Found by the fuzzing: nesting past the JSON parser's recursion, an integer of 5000 digits, a YAML
    alias containing itself, a YAML key that is a list; a CSV response over the csv module's 128 KiB."""
    cases = {  # file: (content, the message after the file's path)
        "deep.json": ("[" * 100_000, ": malformed JSON: nested too deeply"),
        "deep.jsonl": ('{"query": "a", "response": "b"}\n' + "[" * 100_000, " line 2: malformed JSON: nested too deeply"),
        "number.jsonl": ('{"query": "a", "response": ' + "1" * 5000 + "}\n",
                         " line 1: malformed JSON: Exceeds the limit (4300 digits) for integer string conversion"),
        "alias.yaml": ("conversations: &c\n- *c\n", " line 1: malformed YAML: nested more than 100 levels deep"),
        "key.yaml": ("conversations:\n- - {[a]: b}\n  - hi\n",
                     " line 2 field 'conversation[0]': wrong type: expected a string, got object"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError) as refused:
            load_conversations(str(tmp_path / name))
        assert str(refused.value).startswith(str(tmp_path / name) + message), str(refused.value)
    (tmp_path / "long.csv").write_text("query,response\nhi," + "x" * 200_000 + "\n")
    conversations, _ = load_conversations(str(tmp_path / "long.csv"))
    assert len(conversations[0][1]["content"]) == 200_000


CLI_CASES = {
    # name: (command, file name, bytes, what the error line must hold)
    "broken JSON line": ("sft", "chats.jsonl", b'{"messages": [{"role": "user", "content": "hi"}\n', ["line 1", "JSON"]),
    "not UTF-8 in a CSV cell": ("sft", "pairs.csv", b"query,response\nhello,caf\xe9\n",
                                ["line 2", "field 'response'", "not valid UTF-8"]),
    "preferences with an empty rejected": ("dpo", "prefs.jsonl",
                                           b'{"prompt": "hi", "chosen": "hello", "rejected": "go"}\n'
                                           b'{"prompt": "hi", "chosen": "hello", "rejected": " "}\n',
                                           ["line 2", "field 'rejected'", "empty completion"]),
}


@pytest.mark.slow
def test_malformed_data_through_the_command_line_exits_2_without_a_traceback(gpt2_dir, tmp_path):
    """The three cases run at once (each is a torchrun launch that stops at the data)."""
    running = {}
    for name, (command, file_name, content, _) in CLI_CASES.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        (folder / file_name).write_bytes(content)
        args = [sys.executable, "-m", "launcher.cli", command, "--model", str(gpt2_dir), "--data",
                str(folder / file_name), "--output", str(folder / "run"), "--gpus", "cpu"]
        running[name] = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env={**__import__("os").environ, **FIXED_PEAK})
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=600)
        command, file_name, _, expected = CLI_CASES[name]
        assert process.returncode == 2, (name, stdout + stderr)
        assert "Traceback" not in stderr, (name, stderr)
        data = tmp_path / name.replace(" ", "-") / file_name
        error = next(line for line in stderr.splitlines() if line.startswith(f"error: {data}"))
        for part in expected:
            assert part in error, (name, part, error)

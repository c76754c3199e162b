"""Loading and validating dialogue data: exact conversations and preference pairs from every format,
exact error messages (file, line/row, field) for every bad-row kind, exact drop counts with
skip_bad_rows. No network: the hub is replaced by a stand-in."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from dialogtrain.data.load import DataReport, load_conversations, load_preferences
from dialogtrain.data.rows import Preference
from dialogtrain.data.sources import DataError, data_fingerprint, parse_hub_id, read_rows
from dialogtrain.errors import UserError

DATA = Path(__file__).resolve().parent / "fixtures" / "data"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def load_error(load, path, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        load(str(path), **kwargs)
    return str(caught.value)


# ----------------------------------------------------------------------------------------------------
# SFT formats, exact conversations


def test_pairs_csv_with_system_column_quoted_newline_and_extra_column():
    conversations, report = load_conversations(str(DATA / "pairs.csv"))
    assert conversations == [
        [system("You are terse."), user("Hi"), assistant("Hello.")],
        [user("What is 2+2?"), assistant("4")],
        [user('Say "hi"\ntwice'), assistant("hi, hi")],
    ]
    assert (report.rows, report.examples, report.dropped, report.notes) == (3, 3, {}, {})


def test_read_rows_numbers_csv_rows_by_the_line_they_start_on():
    rows = list(read_rows(str(DATA / "pairs.csv")))
    assert [(file, n) for file, n, _ in rows] == [(str(DATA / "pairs.csv"), n) for n in (2, 3, 4)]
    assert rows[0][2] == {"system": "You are terse.", "query": "Hi", "response": "Hello.", "source": "web"}


def test_rows_sharing_dialog_id_join_in_file_order_with_the_first_rows_system():
    conversations, report = load_conversations(str(DATA / "grouped.csv"))
    assert conversations == [
        [system("Be kind."), user("Hello"), assistant("Hi there!"), user("How are you?"), assistant("Fine.")],
        [user("What time is it?"), assistant("Noon.")],
        [user("Standalone?"), assistant("Yes.")],
    ]
    assert (report.rows, report.examples) == (4, 3)


def test_conversation_id_groups_jsonl_rows(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"conversation_id": 7, "query": "a", "response": "b"},
        {"conversation_id": 8, "query": "x", "response": "y"},
        {"conversation_id": 7, "query": "c", "response": "d"},
    ])
    conversations, _ = load_conversations(str(path))
    assert conversations == [[user("a"), assistant("b"), user("c"), assistant("d")], [user("x"), assistant("y")]]


def test_instruction_joins_a_non_empty_input_with_a_blank_line():
    conversations, _ = load_conversations(str(DATA / "instruction.jsonl"))
    assert conversations == [
        [user("Translate to French.\n\ncat"), assistant("chat")],
        [user("Name a colour."), assistant("Blue.")],
        [user("Add the numbers.\n\n2 3"), assistant("5")],
    ]


@pytest.mark.parametrize("user_key, assistant_key", [
    ("query", "response"), ("prompt", "response"), ("question", "answer"), ("user", "assistant"),
    ("input", "output"),
])
def test_pair_column_aliases(tmp_path, user_key, assistant_key):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{user_key: "Q", assistant_key: "A", "extra": 1}])
    assert load_conversations(str(path))[0] == [[user("Q"), assistant("A")]]


def test_message_lists_remove_a_trailing_user_turn_and_an_empty_system_and_count_them():
    conversations, report = load_conversations(str(DATA / "messages.jsonl"))
    assert conversations == [
        [system("Be brief."), user("Hi"), assistant("Hello.")],
        [user("One?"), assistant("1"), user("Two?"), assistant("2")],
        [user("Bye"), assistant("Bye!")],
    ]
    assert report.notes == {"trailing user turn removed": 1, "empty system message removed": 1}
    assert report.summary() == ("data: 3 rows from 1 file -> 3 conversations; "
                                "notes: 1 trailing user turn removed, 1 empty system message removed")


def test_sharegpt_roles_are_mapped_from_an_object_holding_one_list():
    conversations, report = load_conversations(str(DATA / "sharegpt.json"))
    assert conversations == [
        [system("You are a pirate."), user("Hello"), assistant("Ahoy!")],
        [user("Capital of France?"), assistant("Paris."), user("And Italy?"), assistant("Rome.")],
    ]
    assert report.notes == {"trailing user turn removed": 1}


def test_dialog_lines_alternate_user_and_assistant():
    conversations, report = load_conversations(str(DATA / "dialog.jsonl"))
    assert conversations == [
        [user("Does money buy happiness?"), assistant("Depends how much."), user("How much is enough?"),
         assistant("More than you have.")],
        [user("Hi"), assistant("Hey")],
    ]
    assert report.notes == {"trailing user turn removed": 1}


def test_chatterbot_yaml_keeps_scalars_as_written():
    conversations, report = load_conversations(str(DATA / "chatterbot.yml"))
    assert conversations == [
        [user("When were the first Air Jordans released?"), assistant("1984")],
        [user("Is the sky blue?"), assistant("yes")],  # not YAML's boolean True
        [user("Hello"), assistant("Hi"), user("How are you?"), assistant("I am well: thanks.")],
    ]
    assert (report.rows, report.examples, report.notes) == (3, 3, {"trailing user turn removed": 1})


def test_chatterbot_nested_list_utterance_is_a_bad_row(tmp_path):
    path = tmp_path / "odd.yml"
    path.write_text("conversations:\n- - Hi\n  - Hello\n- - Numbers?\n  - - 1\n    - 2\n", encoding="utf-8")
    assert load_error(load_conversations, path) == (
        f"{path} line 4 field 'conversation[1]': wrong type: expected a string, got list")
    conversations, report = load_conversations(str(path), skip_bad_rows=True)
    assert conversations == [[user("Hi"), assistant("Hello")]]
    assert report.dropped == {"wrong type": 1}


def test_real_chatterbot_english_corpus():
    corpus = pytest.importorskip("chatterbot_corpus")
    english = Path(corpus.__file__).parent / "data" / "english"
    # trivia.yml line 35 is a YAML slip: "- question\n  - '22'" reads as one string, not a list.
    assert load_error(load_conversations, english) == (
        f"{english / 'trivia.yml'} line 35 field 'conversation': wrong type: expected a list, got string")
    conversations, report = load_conversations(str(english), skip_bad_rows=True)
    assert (len(report.files), report.rows, report.examples, len(conversations)) == (21, 2026, 2025, 2025)
    assert report.dropped == {"wrong type": 1}
    assert report.notes == {"trailing user turn removed": 43}
    assert conversations[0] == [user("What is AI?"), assistant(
        "Artificial Intelligence is the branch of engineering and science devoted to constructing machines "
        "that think.")]
    assert report.summary() == ("data: 2026 rows from 21 files -> 2025 conversations; dropped 1 (1 wrong type); "
                                "notes: 43 trailing user turn removed")


def test_folder_of_mixed_files_loads_sorted_and_recursive_ignoring_other_extensions():
    conversations, report = load_conversations(str(DATA / "folder"))
    assert conversations == [
        [user("Ping?"), assistant("Pong.")],
        [user("Knock knock"), assistant("Who is there?")],
        [user("Up?"), assistant("Down.")],
    ]
    assert report.files == [str(DATA / "folder" / name) for name in ("a.jsonl", "nested/b.yml", "nested/c.json")]
    assert report.summary() == "data: 3 rows from 3 files -> 3 conversations"


def test_parquet_pairs_and_message_lists(tmp_path):
    pyarrow.parquet.write_table(pyarrow.table({"query": ["Hi", "Yo"], "response": ["Hello", "Hey"]}),
                                tmp_path / "pairs.parquet")
    messages = [[user("a"), assistant("b")], [system("s"), user("c"), assistant("d"), user("e")]]
    pyarrow.parquet.write_table(pyarrow.table({"messages": messages}), tmp_path / "messages.parquet")
    conversations, report = load_conversations(str(tmp_path / "pairs.parquet"))
    assert conversations == [[user("Hi"), assistant("Hello")], [user("Yo"), assistant("Hey")]]
    conversations, report = load_conversations(str(tmp_path / "messages.parquet"))
    assert conversations == [[user("a"), assistant("b")], [system("s"), user("c"), assistant("d")]]
    assert report.notes == {"trailing user turn removed": 1}


@pytest.mark.parametrize("conversation", [
    [user("a"), assistant("b")],
    [system("sys"), user(" padded "), assistant("multi\nline"), user("ünïcödé ✓"), assistant("\u2028 inside")],
    [user('{"json": "text"}'), assistant("\\n literally")],
])
def test_valid_message_lists_round_trip_exactly(tmp_path, conversation):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation}])
    assert load_conversations(str(path))[0] == [conversation]


# ----------------------------------------------------------------------------------------------------
# bad rows: the error names file, line and field; skip_bad_rows drops and counts by reason

GOOD_PAIR = {"query": "ok", "response": "fine"}
GOOD_MESSAGES = {"messages": [user("ok"), assistant("fine")]}

BAD_PAIR_ROWS = [  # (row, field, problem)
    ({"query": "Hi"}, "response", "missing field"),
    ({"query": "Hi", "response": None}, "response", "missing field"),
    ({"query": "Hi", "response": 5}, "response", "wrong type: expected a string, got number"),
    ({"query": "Hi", "response": " \n"}, "response", "empty assistant turn"),
    ({"query": "", "response": "Hello"}, "query", "empty user turn"),
    ({"query": "Hi", "response": "Hello", "system": ["x"]}, "system", "wrong type: expected a string, got list"),
]
BAD_MESSAGE_ROWS = [
    ({"messages": "Hi"}, "messages", "wrong type: expected a list, got string"),
    ({"messages": [assistant("Hello")]}, "messages[0]", "roles out of order: expected user, got assistant"),
    ({"messages": [user("a"), user("b"), assistant("c")]}, "messages[1]",
     "roles out of order: expected assistant, got user"),
    ({"messages": [user("a"), system("s"), assistant("c")]}, "messages[1]",
     "roles out of order: a system message may only come first"),
    ({"messages": [user("only")]}, "messages", "no assistant turn"),
    ({"messages": [system("s")]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "narrator", "content": "a"}, assistant("b")]}, "messages[0].role",
     "unknown role: 'narrator'; expected system, user, assistant (or human, gpt, bot, model)"),
    ({"messages": [{"role": "user", "content": ["a"]}, assistant("b")]}, "messages[0].content",
     "wrong type: expected a string, got list"),
    ({"messages": [user("a"), {"role": "assistant"}]}, "messages[1].content", "missing field"),
    ({"messages": [user("a"), "b"]}, "messages[1]", "wrong type: expected a message object, got string"),
    ({"messages": [user("a"), assistant(" ")]}, "messages[1]", "empty assistant turn"),
    ({"messages": [user("\t"), assistant("b")]}, "messages[0]", "empty user turn"),
    ({"dialog": ["a", "b"]}, "messages", "missing field"),
]
BAD_ROW_CASES = [(GOOD_PAIR, *case) for case in BAD_PAIR_ROWS] + [(GOOD_MESSAGES, *case) for case in BAD_MESSAGE_ROWS]


@pytest.mark.parametrize("good, bad, field, problem", BAD_ROW_CASES)
def test_each_bad_row_kind_names_file_line_and_field(tmp_path, good, bad, field, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    message = load_error(load_conversations, path)
    assert message == f"{path} line 2 field '{field}': {problem}"
    assert isinstance(DataError(message), UserError)


def test_skip_bad_rows_drops_every_bad_row_and_counts_reasons_exactly(tmp_path):
    write_jsonl(tmp_path / "a_pairs.jsonl", [GOOD_PAIR] + [bad for bad, _, _ in BAD_PAIR_ROWS])
    write_jsonl(tmp_path / "b_messages.jsonl", [GOOD_MESSAGES] + [bad for bad, _, _ in BAD_MESSAGE_ROWS])
    conversations, report = load_conversations(str(tmp_path), skip_bad_rows=True)
    assert conversations == [[user("ok"), assistant("fine")]] * 2
    assert report.dropped == {"missing field": 4, "wrong type": 5, "empty assistant turn": 2,
                              "empty user turn": 2, "roles out of order": 3, "no assistant turn": 2,
                              "unknown role": 1}
    assert (report.rows, report.examples) == (21, 2)
    assert report.summary().startswith("data: 21 rows from 2 files -> 2 conversations; dropped 19 (5 wrong type, ")


def test_a_row_that_is_not_an_object_is_a_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "rows.json", [])
    path.write_text(json.dumps([GOOD_PAIR, [1, 2]]), encoding="utf-8")
    assert load_error(load_conversations, path) == f"{path} row 2: wrong type: expected an object with fields, got list"


def test_csv_rows_with_wrong_column_counts(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("query,response\nHi,Hello\nA,B,C\nShort\n", encoding="utf-8")
    assert load_error(load_conversations, path) == (
        f"{path} line 3: wrong number of columns: more values than the header has columns")
    conversations, report = load_conversations(str(path), skip_bad_rows=True)
    assert conversations == [[user("Hi"), assistant("Hello")]]
    assert report.dropped == {"wrong number of columns": 1, "missing field": 1}


def test_non_utf8_bytes_are_a_bad_row_naming_the_field(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"query,response\nHi,Hello\nCaf\xe9,Oui\n")
    assert load_error(load_conversations, path) == f"{path} line 3 field 'query': not valid UTF-8: byte 0xe9"
    jsonl = tmp_path / "messages.jsonl"
    jsonl.write_bytes(b'{"query": "Hi", "response": "Hello"}\n{"query": "Hi", "response": "\xff"}\n')
    assert load_error(load_conversations, jsonl) == f"{jsonl} line 2 field 'response': not valid UTF-8: byte 0xff"
    conversations, report = load_conversations(str(jsonl), skip_bad_rows=True)
    assert conversations == [[user("Hi"), assistant("Hello")]]
    assert report.dropped == {"not valid UTF-8": 1}


def test_non_utf8_yaml_names_the_line(tmp_path):
    path = tmp_path / "corpus.yml"
    path.write_bytes(b"conversations:\n- - Hi\n  - Caf\xe9\n")
    assert load_error(load_conversations, path) == f"{path} line 3: not valid UTF-8 (byte 0xe9)"


def test_every_row_dropped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"query": "", "response": "x"}, {"query": "a", "response": ""}])
    assert load_error(load_conversations, path, skip_bad_rows=True) == (
        f"{path}: no usable rows (2 rows read, all dropped: 1 empty user turn, 1 empty assistant turn)")


# ----------------------------------------------------------------------------------------------------
# whole-file problems: always an error, with the file named


def test_malformed_json_line_stops_even_with_skip_bad_rows(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"query": "a", "response": "b"}\n\n{"query": "a",\n', encoding="utf-8")
    message = load_error(load_conversations, path, skip_bad_rows=True)
    assert message.startswith(f"{path} line 3: malformed JSON: ")


def test_malformed_json_file_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"query": "a" "response": "b"}\n]\n', encoding="utf-8")
    assert load_error(load_conversations, path) == (
        f"{path} line 2 column 17: malformed JSON: Expecting ',' delimiter")


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.json", ""), ("list.json", "[]"), ("empty.csv", ""),
    ("header.csv", "query,response\n"), ("empty.yml", ""), ("none.yaml", "conversations: []\n"),
])
def test_empty_file_has_no_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert load_error(load_conversations, path) == f"{path}: no rows"


def test_empty_parquet_has_no_rows(tmp_path):
    path = tmp_path / "empty.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"query": pyarrow.array([], pyarrow.string())}), path)
    assert load_error(load_conversations, path) == f"{path}: no rows"


@pytest.mark.parametrize("name", ["missing.jsonl", "data/sub/missing", "data/missing.csv", "./missing", "/no/such/dir"])
def test_missing_path_is_no_such_file(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert load_error(load_conversations, name) == f"{name}: no such file"


def test_empty_folder_unsupported_file_and_unknown_format(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi", encoding="utf-8")
    assert load_error(load_conversations, tmp_path / "empty").startswith(f"{tmp_path / 'empty'}: no data files")
    assert load_error(load_conversations, tmp_path / "empty" / "readme.txt").startswith(
        f"{tmp_path / 'empty' / 'readme.txt'}: unsupported file type")
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hello"}])
    assert load_error(load_conversations, path).startswith(
        f"{path} line 1: cannot tell the data format from the fields ('text'); expected pairs (query/response")
    assert load_error(load_preferences, DATA / "pairs.csv").startswith(
        f"{DATA / 'pairs.csv'} line 2: cannot tell the data format from the fields ('system', 'query', ")


def test_yaml_that_is_not_a_chatterbot_corpus(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("name: x\n", encoding="utf-8")
    assert load_error(load_conversations, path).startswith(f"{path}: expected chatterbot-corpus YAML")
    path.write_text("conversations: [\n", encoding="utf-8")
    assert load_error(load_conversations, path).startswith(f"{path}: malformed YAML: ")


# ----------------------------------------------------------------------------------------------------
# the hub (replaced by a stand-in: no network in tests)


def test_hub_id_parsing():
    assert parse_hub_id("org/name") == ("org/name", None, "train")
    assert parse_hub_id("org/name:cfg@test[:10%]") == ("org/name", "cfg", "test[:10%]")


def test_hub_dataset_rows_load_through_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"prompt": "Hi", "response": "Hello"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    conversations, report = load_conversations("org/chat:default@validation")
    assert calls == [("org/chat", "default", "validation")]
    assert conversations == [[user("Hi"), assistant("Hello")]]
    assert report.summary() == "data: 1 row from hub dataset org/chat:default@validation -> 1 conversation"
    assert data_fingerprint("org/chat:default@validation") == "org/chat:default@validation"


def test_hub_failure_is_a_data_error_not_a_traceback(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert load_error(load_preferences, "org/prefs") == (
        "org/prefs: no such local file or folder, and the Hugging Face hub dataset could not be loaded "
        "(no network?): Couldn't reach the Hub")


# ----------------------------------------------------------------------------------------------------
# preference formats, exact pairs


def test_prompt_chosen_rejected_strings_with_optional_system():
    preferences, report = load_preferences(str(DATA / "prefs_prompt.csv"))
    assert preferences == [
        Preference(prompt=[user("Say hello.")], chosen="Hello!", rejected="Go away."),
        Preference(prompt=[system("Answer in French."), user("Say thanks.")], chosen="Merci.", rejected="Thanks."),
    ]
    assert report.summary() == "data: 2 rows from 1 file -> 2 preference pairs"


def test_orca_pairs_with_empty_system_meaning_none():
    preferences, _ = load_preferences(str(DATA / "prefs_orca.jsonl"))
    assert preferences == [
        Preference(prompt=[user("What is 3 x 4?")], chosen="3 x 4 = 12.", rejected="3 x 4 = 7."),
        Preference(prompt=[system("You are a careful assistant."), user("Is water wet?")],
                   chosen="Water makes things wet.", rejected="No."),
    ]


def test_hh_transcripts_split_at_the_last_assistant_turn():
    preferences, _ = load_preferences(str(DATA / "prefs_hh.jsonl"))
    assert preferences == [
        Preference(prompt=[user("Hi"), assistant("Hello, how can I help?"), user("Tell me a joke.")],
                   chosen="Why did the chicken cross the road?", rejected="No."),
        Preference(prompt=[user("What is 2+2?")], chosen="4", rejected="5"),
    ]


def test_message_lists_sharing_a_prefix_and_prompt_with_single_assistant_messages():
    preferences, _ = load_preferences(str(DATA / "prefs_messages.jsonl"))
    assert preferences == [
        Preference(prompt=[system("Be nice."), user("Hi"), assistant("Hello!"), user("Rate me.")],
                   chosen="You are great.", rejected="Meh."),
        Preference(prompt=[user("Best fruit?")], chosen="Mango.", rejected="Rocks."),
    ]


def test_prompt_column_next_to_full_message_lists_uses_the_shared_prefix(tmp_path):
    path = write_jsonl(tmp_path / "ultrafeedback.jsonl", [{
        "prompt": "Q?", "chosen": [user("Q?"), assistant("good")], "rejected": [user("Q?"), assistant("bad")]}])
    assert load_preferences(str(path))[0] == [Preference(prompt=[user("Q?")], chosen="good", rejected="bad")]


GOOD_PREFERENCE = {"prompt": "Q", "chosen": "A", "rejected": "B"}
HH = "\n\nHuman: Hi\n\nAssistant: "
BAD_PREFERENCE_CASES = [  # (good first row, bad row, field, problem)
    (GOOD_PREFERENCE, {"prompt": "Q", "chosen": " same", "rejected": "same "}, "rejected", "chosen == rejected"),
    (GOOD_PREFERENCE, {"prompt": " ", "chosen": "A", "rejected": "B"}, "prompt", "empty prompt"),
    (GOOD_PREFERENCE, {"prompt": "Q", "chosen": "", "rejected": "B"}, "chosen", "empty completion"),
    (GOOD_PREFERENCE, {"prompt": "Q", "chosen": "A"}, "rejected", "missing field"),
    (GOOD_PREFERENCE, {"prompt": "Q", "chosen": 3, "rejected": "B"}, "chosen",
     "wrong type: expected a string, got number"),
    (GOOD_PREFERENCE, {"prompt": [user("Q"), assistant("A")], "chosen": "A", "rejected": "B"}, "prompt[1]",
     "prompt does not end with a user turn"),
    (GOOD_PREFERENCE, {"prompt": [system("s"), user("Q")], "system": "t", "chosen": "A", "rejected": "B"},
     "system", "roles out of order: a system message in both 'system' and 'prompt'"),
    (GOOD_PREFERENCE, {"chosen": [user("Q"), assistant("A")], "rejected": [user("R"), assistant("B")]},
     "rejected", "prompts differ: chosen and rejected must share every message but the last"),
    (GOOD_PREFERENCE, {"chosen": [user("Q"), assistant("A")], "rejected": [user("Q")]},
     "rejected", "no assistant turn: the last message must be the assistant's completion"),
    ({"chosen": HH + "A", "rejected": HH + "B"}, {"chosen": HH + "A", "rejected": HH + " A "}, "rejected",
     "chosen == rejected"),
    ({"chosen": HH + "A", "rejected": HH + "B"},
     {"chosen": HH + "A", "rejected": "\n\nHuman: Bye\n\nAssistant: B"}, "rejected",
     "prompts differ: the transcripts differ before the last assistant turn"),
    ({"chosen": HH + "A", "rejected": HH + "B"}, {"chosen": "\n\nHuman: Hi", "rejected": HH + "B"}, "chosen",
     "malformed transcript: no '\\n\\nAssistant:' turn"),
    ({"chosen": HH + "A", "rejected": HH + "B"}, {"chosen": "\n\nAssistant: A", "rejected": "\n\nAssistant: B"},
     "chosen", "empty prompt"),
    ({"question": "Q", "chosen": "A", "rejected": "B"}, {"question": "", "chosen": "A", "rejected": "B"},
     "question", "empty prompt"),
]


@pytest.mark.parametrize("good, bad, field, problem", BAD_PREFERENCE_CASES)
def test_each_bad_preference_row_names_file_line_and_field(tmp_path, good, bad, field, problem):
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, bad])
    assert load_error(load_preferences, path) == f"{path} line 2 field '{field}': {problem}"


def test_skip_bad_rows_drops_bad_preference_pairs_by_reason(tmp_path):
    rows = [GOOD_PREFERENCE] + [bad for good, bad, _, _ in BAD_PREFERENCE_CASES[:9]]
    preferences, report = load_preferences(str(write_jsonl(tmp_path / "prefs.jsonl", rows)), skip_bad_rows=True)
    assert preferences == [Preference(prompt=[user("Q")], chosen="A", rejected="B")]
    assert report.dropped == collections.Counter({
        "chosen == rejected": 1, "empty prompt": 1, "empty completion": 1, "missing field": 1, "wrong type": 1,
        "prompt does not end with a user turn": 1, "roles out of order": 1, "prompts differ": 1,
        "no assistant turn": 1})


# ----------------------------------------------------------------------------------------------------
# fingerprint and report


def test_data_fingerprint_follows_content_not_location(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    shutil.copytree(DATA / "folder", first)
    shutil.copytree(DATA / "folder", second)
    assert data_fingerprint(str(first)) == data_fingerprint(str(second))
    single = data_fingerprint(str(first / "a.jsonl"))
    assert len(single) == 64 and single != data_fingerprint(str(first))
    (first / "a.jsonl").write_text('{"query": "Ping?", "response": "Pong!"}\n', encoding="utf-8")
    assert data_fingerprint(str(first / "a.jsonl")) != single
    assert data_fingerprint(str(first)) != data_fingerprint(str(second))
    renamed = tmp_path / "renamed"
    shutil.copytree(DATA / "folder", renamed)
    (renamed / "nested" / "c.json").rename(renamed / "nested" / "d.json")
    assert data_fingerprint(str(renamed)) != data_fingerprint(str(second))


def test_report_summary_singular_and_dropped():
    report = DataReport(source="x", files=["x.jsonl"], rows=1, examples=1,
                        dropped=collections.Counter({"empty assistant turn": 2, "roles out of order": 1}))
    assert report.summary() == ("data: 1 row from 1 file -> 1 conversation; "
                                "dropped 3 (2 empty assistant turn, 1 roles out of order)")

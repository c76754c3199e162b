"""Exact duplicates and train/eval overlap (issue 10/13): exact counts and summary lines on small files of
every format with known duplicates and overlap, --keep-duplicates, --keep-overlap, --eval-split, the
worker's step counts and resume on de-duplicated data, and held-out sets of the demo and the bench that
share nothing with their training sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dialogtrain.data.dedup import (
    conversation_key,
    find_duplicates,
    opening_key,
    preference_key,
    prompt_key,
    split_by_key,
)
from dialogtrain.data.load import load_preferences
from dialogtrain.data.prepare import CONVERSATIONS, PREFERENCES, select_examples
from dialogtrain.errors import UserError
from dialogtrain.options import DataOptions
from tests.checkpoint_helpers import final_weights, logged_steps, metrics_after, rewind
from tests.sft_harness import PAIRS, train_in_process, write_pairs_csv, write_run_dir

# Conversation 2 is conversation 0 with other whitespace, conversation 4 is conversation 0 again.
CHATS = [("hello there", "hi how are you"), ("what is your name", "my name is bot"),
         ("hello  there ", "hi how are\nyou"), ("good bye", "see you later"), ("hello there", "hi how are you")]
DROPPED = "dropped, the first of each kept (--keep-duplicates keeps them)"
# Pair 1 is pair 0 with other whitespace; pair 2 shares pair 0's prompt but not its chosen: no duplicate.
PREFS = [("what is your name", "my name is bot", "go away"), ("what is  your name\n", "my name is bot ", "go away"),
         ("what is your name", "i am a bot", "go away"), ("good bye", "see you later", "no")]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_chats(path: Path, chats=CHATS) -> Path:
    """`chats` (user, assistant) in the format the file extension (and name) says."""
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([("query", "response"), *chats])
    elif path.suffix == ".yml":
        path.write_text("conversations:\n" + "".join(f"- - {json.dumps(u)}\n  - {json.dumps(a)}\n" for u, a in chats))
    elif path.name.startswith("sharegpt"):
        path.write_text(json.dumps([{"conversations": [{"from": "human", "value": u}, {"from": "gpt", "value": a}]}
                                    for u, a in chats]))
    else:
        path.write_text("".join(json.dumps({"messages": [user(u), assistant(a)]}) + "\n" for u, a in chats))
    return path


def write_prefs(path: Path, prefs=PREFS) -> Path:
    """`prefs` (prompt, chosen, rejected) in the format the file name says."""
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([("prompt", "chosen", "rejected"), *prefs])
        return path
    if path.name.startswith("orca"):
        rows = [{"system": "", "question": p, "chosen": c, "rejected": r} for p, c, r in prefs]
    elif path.name.startswith("hh"):
        rows = [{"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}"}
                for p, c, r in prefs]
    else:
        rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in prefs]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def select(kind=CONVERSATIONS, seed=0, **data):
    return select_examples(DataOptions(**{name: str(v) if isinstance(v, Path) else v for name, v in data.items()}),
                           kind, seed)


def contents(loaded) -> list:
    return [(item.source, item.example) for item in loaded]


# ----------------------------------------------------------------------------------------------------
# keys and the pure functions


def test_keys_normalise_the_whitespace_of_every_turn(tmp_path):
    assert conversation_key([user(" hi\tthere\n"), assistant("yes  ")]) == (("user", "hi there"), ("assistant", "yes"))
    pairs, _ = load_preferences(str(write_prefs(tmp_path / "prefs.jsonl")))
    assert preference_key(pairs[0]) == preference_key(pairs[1]) != preference_key(pairs[2])
    assert prompt_key(pairs[0]) == prompt_key(pairs[2]) == (("user", "what is your name"),)
    assert opening_key([{"role": "system", "content": "be nice"}, user("a  b"), assistant("c")]) == (("user", "a b"),)


def test_find_duplicates_keeps_the_first_and_counts_the_copies_per_file():
    found = find_duplicates(list("abaac"), lambda x: x, ["x", "x", "y", "y", "x"])
    assert (found.first, found.copies, found.duplicated, dict(found.copies_by_file)) == ([0, 1, 4], 2, 1, {"y": 2})


def test_split_by_key_holds_out_whole_groups_and_exactly_the_count_it_can():
    keys = list("aabbbcdde")  # groups a:2, b:3, c:1, d:2, e:1
    for seed in range(6):
        kept, held = split_by_key(keys, lambda x: x, 3, seed)
        assert len(held) == 3 and sorted(kept + held) == list(range(9))
        assert not {keys[i] for i in held} & {keys[i] for i in kept}
    assert split_by_key(keys, lambda x: x, 3, 0) == split_by_key(keys, lambda x: x, 3, 0)
    assert len({tuple(split_by_key(keys, lambda x: x, 3, seed)[1]) for seed in range(6)}) > 1


# ----------------------------------------------------------------------------------------------------
# duplicates at load


@pytest.mark.parametrize("name", ["messages.jsonl", "pairs.csv", "chatterbot.yml", "sharegpt.json"])
def test_duplicate_conversations_are_found_and_dropped_in_every_format(tmp_path, name):
    data = write_chats(tmp_path / name)
    selection = select(data=data)
    assert selection.lines == [f"train: 5 conversations, 2 exact duplicates of 1 distinct one; {DROPPED}"]
    assert [item.example for item in selection.train] == [[user(u), assistant(a)] for u, a in
                                                           (CHATS[0], CHATS[1], CHATS[3])]
    kept = select(data=data, keep_duplicates=True)
    assert kept.lines == ["train: 5 conversations, 2 exact duplicates of 1 distinct one; kept (--keep-duplicates)"]
    assert len(kept.train) == 5


@pytest.mark.parametrize("name", ["prefs.jsonl", "prefs.csv", "orca.jsonl", "hh.jsonl"])
def test_duplicate_preference_pairs_need_the_same_prompt_chosen_and_rejected(tmp_path, name):
    selection = select(PREFERENCES, data=write_prefs(tmp_path / name))
    assert selection.lines == [f"train: 4 preference pairs, 1 exact duplicate of 1 distinct one; {DROPPED}"]
    assert [(p.prompt[-1]["content"], p.chosen) for p in (item.example for item in selection.train)] == [
        ("what is your name", "my name is bot"), ("what is your name", "i am a bot"), ("good bye", "see you later")]


def test_duplicates_across_the_files_of_a_folder_are_counted_per_file(tmp_path):
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    write_chats(tmp_path / "folder" / "a.jsonl", CHATS[:2])
    write_chats(tmp_path / "folder" / "sub" / "b.csv", CHATS[2:])
    selection = select(data=tmp_path / "folder")
    assert selection.lines == [f"train: 5 conversations, 2 exact duplicates of 1 distinct one (sub/b.csv 2); {DROPPED}"]
    assert [Path(item.file).name for item in selection.train] == ["a.jsonl", "a.jsonl", "b.csv"]


def test_duplicates_across_several_files_and_formats(tmp_path):
    a = write_chats(tmp_path / "a.jsonl", CHATS[:3])  # holds one copy itself
    b = write_chats(tmp_path / "b.yml", [CHATS[1], CHATS[0], ("is it warm", "it is sunny")])  # two copies of a's
    selection = select(data=f"{a},{b}")
    assert selection.lines == [f"train: 6 conversations, 3 exact duplicates of 2 distinct ones (b.yml 2, a.jsonl 1); "
                               f"{DROPPED}"]
    assert [(item.source, item.example[0]["content"]) for item in selection.train] == [
        ("a", "hello there"), ("a", "what is your name"), ("b", "is it warm")]


# ----------------------------------------------------------------------------------------------------
# train/eval overlap and --eval-split


def test_eval_conversations_seen_in_training_are_left_out_unless_keep_overlap(tmp_path):
    data = write_chats(tmp_path / "train.jsonl", CHATS[:2])
    held = write_chats(tmp_path / "eval.csv", [CHATS[2], ("is it warm", "it is sunny"), ("what is your name", "bot")])
    selection = select(data=data, eval_data=held)
    # CHATS[2] is CHATS[0] up to whitespace; the third shares a user turn only, which is not the conversation
    assert selection.lines[1:] == ["eval: 3 conversations, no exact duplicates",
                                   "eval: 1 of 3 conversations also occurs in --data; left out of evaluation "
                                   "(--keep-overlap keeps them)"]
    assert [item.example[0]["content"] for item in selection.eval] == ["is it warm", "what is your name"]
    kept = select(data=data, eval_data=held, keep_overlap=True)
    assert kept.lines[-1] == "eval: 1 of 3 conversations also occurs in --data; evaluated all the same (--keep-overlap)"
    assert len(kept.eval) == 3


def test_eval_pairs_whose_prompt_was_trained_on_are_left_out(tmp_path):
    data = write_prefs(tmp_path / "train.jsonl", PREFS[:1])
    held = write_prefs(tmp_path / "eval.jsonl", [PREFS[2], PREFS[3], ("is it warm", "yes", "no")])
    selection = select(PREFERENCES, data=data, eval_data=held)
    assert selection.lines[-1] == ("eval: 1 of 3 preference pairs has a prompt that also occurs in --data; left out "
                                   "of evaluation (--keep-overlap keeps them)")
    assert [item.example.prompt[0]["content"] for item in selection.eval] == ["good bye", "is it warm"]


def test_an_eval_set_that_is_all_training_data_is_refused_naming_keep_overlap(tmp_path):
    data = write_chats(tmp_path / "train.jsonl")
    with pytest.raises(UserError, match=r"eval: 3 of 3 conversations also occur in --data: nothing of --eval-data "
                                        r"is held out.*--keep-overlap"):
        select(data=data, eval_data=data)


def test_eval_split_holds_out_distinct_conversations_after_de_duplication(tmp_path):
    chats = [(f"question {i}", f"answer {i}") for i in range(10)]
    data = write_chats(tmp_path / "train.jsonl", chats + chats[:4])  # 14 rows, 10 distinct
    selection = select(data=data, eval_split=0.3, seed=5)
    assert selection.lines == [f"train: 14 conversations, 4 exact duplicates of 4 distinct ones; {DROPPED}",
                               "eval: --eval-split 0.3 holds out 3 of 10 conversations (--seed 5); no conversation "
                               "is shared with training"]
    train = {conversation_key(item.example) for item in selection.train}
    held = {conversation_key(item.example) for item in selection.eval}
    assert (len(train), len(held), train & held) == (7, 3, set())
    assert contents(select(data=data, eval_split=0.3, seed=5).eval) == contents(selection.eval)
    assert len({repr(contents(select(data=data, eval_split=0.3, seed=seed).eval)) for seed in range(4)}) > 1


def test_eval_split_of_pairs_never_splits_a_prompt(tmp_path):
    prefs = [(f"question {i}", f"good {j}", "bad") for i in range(6) for j in range(2)]  # 6 prompts x 2 pairs
    selection = select(PREFERENCES, data=write_prefs(tmp_path / "prefs.jsonl", prefs), eval_split=0.25, seed=1)
    assert selection.lines[-1] == ("eval: --eval-split 0.25 holds out 2 of 12 preference pairs (--seed 1); "
                                   "no prompt is shared with training")
    train = {prompt_key(item.example) for item in selection.train}
    held = {prompt_key(item.example) for item in selection.eval}
    assert (len(selection.train), len(held), train & held) == (10, 1, set())


@pytest.mark.parametrize("flags, problem", [
    (["--eval-split", "0.2", "--eval-data", "E"], "--eval-split and --eval-data: the eval set comes from one of them"),
    (["--keep-overlap"], "--keep-overlap needs --eval-data"),
    (["--eval-split", "1.5"], "--eval-split must be a fraction in [0, 1), got 1.5"),
    (["--eval-on-start"], "--eval-on-start needs an eval set: --eval-data or --eval-split"),
])
def test_impossible_data_flags_are_refused_at_launch(tmp_path, flags, problem):
    from launcher.cli import cli

    result = CliRunner().invoke(cli, ["sft", "--model", "m", "--data", "d.jsonl", "--output", str(tmp_path / "run"),
                                      "--gpus", "cpu", "--dry-run", *flags])
    assert result.exit_code == 2 and problem in result.output, result.output


# ----------------------------------------------------------------------------------------------------
# the worker trains on the de-duplicated data, and resumes on it


def test_steps_follow_the_de_duplicated_data_and_resume_exactly(gpt2_dir, tmp_path, capfd):
    data = write_pairs_csv(tmp_path / "pairs.csv", PAIRS + PAIRS[:4])  # 12 rows, 8 distinct
    flags = dict(model=str(gpt2_dir), data=str(data), micro_batch=2, epochs=2, save_every=2, lr=5e-3,
                 precision="fp32", gpus="cpu")
    train_in_process(write_run_dir(tmp_path / "run", **flags))
    assert logged_steps(tmp_path / "run") == list(range(1, 9))  # 8 distinct pairs / batch 2 x 2 epochs
    err = capfd.readouterr().err
    assert f"train: 12 conversations, 4 exact duplicates of 4 distinct ones; {DROPPED}" in err
    assert "plan: 8 examples" in err

    resumed = rewind(tmp_path / "run", tmp_path / "resumed", step=6)
    train_in_process(write_run_dir(resumed, resume="auto", **flags))
    assert metrics_after(resumed, 6) == metrics_after(tmp_path / "run", 6)
    want, got = final_weights(tmp_path / "run" / "final"), final_weights(resumed / "final")
    assert all(torch.equal(want[name], got[name]) for name in want)

    train_in_process(write_run_dir(tmp_path / "kept", keep_duplicates=True, **{**flags, "epochs": 1}))
    assert logged_steps(tmp_path / "kept") == list(range(1, 7))  # 12 pairs / batch 2


# ----------------------------------------------------------------------------------------------------
# the demo's and the bench's held-out sets


def test_the_demo_holds_out_conversations_whose_opening_prompt_training_never_saw():
    from dialogtrain.data.load import load_conversations
    from dialogtrain.demo import chatterbot_english, split_held_out

    conversations, _ = load_conversations(str(chatterbot_english()), skip_bad_rows=True)
    train, held = split_held_out(conversations, 6)
    distinct = {conversation_key(c) for c in conversations}
    assert len(held) == 6 and len(train) + len(held) == len(distinct) < len(conversations)
    assert len({conversation_key(c) for c in train}) == len(train)  # no duplicate left in training
    assert not {opening_key(c) for c in held} & {opening_key(c) for c in train}
    assert not {conversation_key(c) for c in held} & {conversation_key(c) for c in train}


def test_the_bench_held_out_sets_share_no_conversation_or_prompt_with_training(tmp_path):
    from bench.plan import FULL
    from bench.workload import write_workload

    files = write_workload(tmp_path, FULL.sft_held_out, FULL.dpo_steps * FULL.micro_batch, FULL.dpo_held_out)
    rows = {name: [json.loads(line) for line in Path(path).read_text().splitlines()] for name, path in files.items()}
    sft_train = [conversation_key(r["messages"]) for r in rows["sft_train"]]
    sft_eval = [conversation_key(r["messages"]) for r in rows["sft_eval"]]
    assert len(sft_eval) == FULL.sft_held_out and len(set(sft_train)) == len(sft_train)
    assert not set(sft_eval) & set(sft_train)
    prompts = {name: {conversation_key(r["prompt"]) for r in rows[name]} for name in ("trl_dpo_train", "trl_dpo_eval")}
    assert len(rows["trl_dpo_eval"]) == FULL.dpo_held_out and not prompts["trl_dpo_eval"] & prompts["trl_dpo_train"]
    ours = {conversation_key(r["chosen"][:-1]) for r in rows["dpo_eval"]}
    assert ours == prompts["trl_dpo_eval"]
    assert not ours & {conversation_key(r["chosen"][:-1]) for r in rows["dpo_train"]}
    trained_openings = {opening_key(r["messages"]) for r in rows["sft_train"]}
    assert not {opening_key(r["prompt"]) for r in rows["trl_dpo_eval"]} & trained_openings

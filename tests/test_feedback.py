"""Ratings in `dialogtrain chat`: the rows /good, /bad and /prefer append, where they go, what is refused; a real
terminal and a real pipe writing them; `dialogtrain kto` and `dpo` training on what the chat wrote; a damaged
feedback file stopped at its bad row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dialogtrain.chat.feedback import Feedback, default_feedback_path
from dialogtrain.data.load import load_preferences, load_ratings
from dialogtrain.data.sources import DataError
from dialogtrain.errors import UserError
from dialogtrain.train.metrics import read_metrics
from tests.sft_harness import train_in_process, write_run_dir
from tests.test_chat_terminal import REPO, exchange, greedy_ids, spawn_chat

HI = {"role": "user", "content": "hi"}
SYSTEM = {"role": "system", "content": "be brief"}


def bot(name: str, *messages: dict) -> SimpleNamespace:
    """What Feedback reads of a chat.session.Bot: its name and history."""
    return SimpleNamespace(name=name, history=list(messages))


def reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_file_is_in_the_checkpoints_run_folder(tmp_path):
    run = tmp_path / "runs" / "sft"
    (run / "final").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert default_feedback_path(str(run)) == run / "feedback.jsonl"
    assert default_feedback_path(str(run / "final")) == run / "feedback.jsonl"
    assert default_feedback_path(str(tmp_path / "hf")) == tmp_path / "hf" / "feedback.jsonl"  # a model folder
    assert default_feedback_path(str(gguf)) == tmp_path / "feedback.jsonl"


def test_good_and_bad_append_kto_rows_with_the_whole_conversation_as_prompt(tmp_path):
    feedback = Feedback.open(str(tmp_path / "f.jsonl"), "unused")
    one = bot("sft", SYSTEM, HI, reply("hello"))
    assert feedback.rate("/good", "", [one]) == f"(rated the reply good: 1 this chat, in {tmp_path / 'f.jsonl'})"
    assert feedback.rate("/bad", "", [one]) == "(this reply is already rated; the next message gets a new one)"
    one.history = [*one.history, {"role": "user", "content": "and you"}, reply("go away")]
    assert feedback.rate("/bad", "", [one]).startswith("(rated the reply bad: 2 this chat")
    assert rows(tmp_path / "f.jsonl") == [
        {"prompt": [SYSTEM, HI], "completion": "hello", "label": True},
        {"prompt": [SYSTEM, HI, reply("hello"), {"role": "user", "content": "and you"}], "completion": "go away",
         "label": False}]
    ratings, _ = load_ratings(str(tmp_path / "f.jsonl"))
    assert [(r.prompt[-1]["content"], r.completion, r.desirable) for r in ratings] == [
        ("hi", "hello", True), ("and you", "go away", False)]


def test_compared_replies_append_pairs(tmp_path):
    feedback = Feedback.open(str(tmp_path / "f.jsonl"), "unused")
    bots = [bot("sft", HI, reply("hello")), bot("dpo", HI, reply("hi there"))]
    assert feedback.rate("/good", "B", bots).startswith("(rated dpo's reply better: 1 this chat")
    bots = [bot("sft", HI, reply("hello"), HI, reply("yes")), bot("dpo", HI, reply("hi there"), HI, reply("no"))]
    assert feedback.rate("/bad", "dpo", bots).startswith("(rated sft's reply better: 2 this chat")
    bots = [bot("sft", HI, reply("a")), bot("dpo", HI, reply("b"))]
    assert feedback.rate("/prefer", "SFT", bots).startswith("(rated sft's reply better: 3 this chat")
    assert rows(tmp_path / "f.jsonl") == [
        {"prompt": [HI], "chosen": "hi there", "rejected": "hello"},
        {"prompt": [HI, reply("hello"), HI], "chosen": "yes", "rejected": "no"},  # the better bot's conversation
        {"prompt": [HI], "chosen": "a", "rejected": "b"}]
    pairs, _ = load_preferences(str(tmp_path / "f.jsonl"))
    assert [(p.chosen, p.rejected) for p in pairs] == [("hi there", "hello"), ("yes", "no"), ("a", "b")]


def test_what_cannot_be_rated_is_said_and_nothing_written(tmp_path):
    path = tmp_path / "f.jsonl"
    feedback = Feedback.open(str(path), "unused")
    two = [bot("sft", HI, reply("same")), bot("dpo", HI, reply("same "))]
    assert feedback.rate("/good", "", [bot("sft", SYSTEM)]) == "(nothing to rate yet: rate a reply after it is given)"
    assert feedback.rate("/good", "", [bot("sft", HI, reply("  "))]) == "(the last reply is empty: nothing to rate)"
    assert feedback.rate("/prefer", "sft", [bot("sft", HI, reply("x"))]) == (
        "(/prefer sft: with one bot, rate its last reply with /good or /bad)")
    assert feedback.rate("/good", "", two) == ("(with two bots, say which reply: /good A|B|NAME (A, B, sft, dpo); "
                                               "/good and /prefer name the better one, /bad the worse)")
    assert feedback.rate("/good", "a", two) == "(the two replies are the same: no preference to record)"
    assert not path.exists()


def test_a_feedback_file_that_cannot_be_written_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"--feedback .*/missing/f.jsonl: cannot write ratings there \(no folder"):
        Feedback.open(str(tmp_path / "missing" / "f.jsonl"), "unused")
    with pytest.raises(UserError, match=r"cannot write ratings there \(it is a folder\)"):
        Feedback.open(str(tmp_path), "unused")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(UserError, match="is not writable"):
            Feedback.open(str(tmp_path / "ro" / "f.jsonl"), "unused")
    # the default file is only checked when a rating is written: the chat starts, the rating is refused
    feedback = Feedback.open(None, str(tmp_path / "gone" / "model"))
    assert feedback.rate("/good", "", [bot("sft", HI, reply("x"))]) == (
        f"(cannot write ratings to {tmp_path / 'gone' / 'model' / 'feedback.jsonl'} (no folder "
        f"{tmp_path / 'gone' / 'model'}); start the chat with --feedback FILE)")


def test_a_damaged_feedback_file_stops_at_its_bad_row(tmp_path):
    path = tmp_path / "f.jsonl"
    feedback = Feedback.open(str(path), "unused")
    feedback.rate("/good", "", [bot("sft", HI, reply("hello"))])
    with open(path, "a") as f:
        f.write(json.dumps({"prompt": [HI], "completion": "x", "label": "thumbs up"}) + "\n")
    with pytest.raises(DataError, match=r"f.jsonl line 2 field 'label': wrong type: expected true or false, got "
                                        r"string 'thumbs up'"):
        load_ratings(str(path))
    with pytest.raises(DataError, match=r"f.jsonl line 1 field 'chosen': rating, not a pair: this row rates one "
                                        r"completion \(label\); `dialogtrain kto` trains on ratings"):
        load_preferences(str(path))


# --- the chat writing them, and the trainers reading them ---------------------------------------------------

@pytest.fixture(scope="module")
def llama(llama_dir):
    from dialogtrain.chat.generate import load_chat_model

    return load_chat_model(str(llama_dir), device="cpu", dtype="fp32")


def chat_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", "chat", *args, "--greedy", "--max-new-tokens", "10", "--device",
            "cpu", "--dtype", "fp32"]


def test_piped_ratings_are_written_and_kto_trains_on_them(llama_dir, llama, tmp_path):
    """A real pipe: a rating line gets a blank stdout line (line i still answers line i) and its notice on
    stderr; the rows are the conversation as the model saw it; `dialogtrain kto` trains on the file."""
    model, tokenizer = llama
    path = tmp_path / "feedback.jsonl"
    messages = ["hello there", "what is your name", "tell me a joke please", "good bye"]
    ratings = ["/good", "/bad", "/bad", "/good"]
    lines = [line for pair in zip(messages, ratings, strict=True) for line in pair]
    done = subprocess.run(chat_argv(str(llama_dir), "--feedback", str(path)), input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    history, expected = [], []
    for text, rating in zip(messages, ratings, strict=True):
        prompt = [*history, {"role": "user", "content": text}]
        answer = tokenizer.decode(greedy_ids(model, tokenizer, prompt, 10), skip_special_tokens=True).strip()
        expected.append({"prompt": prompt, "completion": answer, "label": rating == "/good"})
        history = [*prompt, reply(answer)]
    assert rows(path) == expected
    assert done.stdout.split("\n")[1::2] == ["", "", "", ""]  # the rating lines' answers
    assert done.stdout.split("\n")[0] == " ".join(expected[0]["completion"].splitlines())
    assert f"(rated the reply bad: 3 this chat, in {path})" in done.stderr

    run_dir = tmp_path / "kto"
    train_in_process(write_run_dir(run_dir, command="kto", model=str(llama_dir), data=str(path), micro_batch=2,
                                   max_steps=2, lr=1e-2, precision="fp32", gpus="cpu"), "kto")
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(records) == 2 and records[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert (run_dir / "final" / "config.json").is_file()


def test_compared_replies_from_a_pipe_train_dpo(llama_dir, tmp_path):
    """--compare with a second tiny Llama (other weights, the same tokenizer): /good B, /prefer NAME and /bad A
    write pairs that `dialogtrain dpo` trains on."""
    from tests.conftest import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", seed=1)
    path = tmp_path / "feedback.jsonl"
    lines = ["hello there", "/good B", "what is your name", "/prefer other", "tell me a joke please", "/bad A"]
    done = subprocess.run(chat_argv(str(llama_dir), "--compare", str(other), "--feedback", str(path)),
                          input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    written = rows(path)
    assert len(written) == 3 and all(set(row) == {"prompt", "chosen", "rejected"} for row in written)
    assert [row["prompt"][-1]["content"] for row in written] == ["hello there", "what is your name",
                                                                 "tell me a joke please"]
    assert done.stderr.count("(rated other's reply better") == 3
    run_dir = tmp_path / "dpo"
    train_in_process(write_run_dir(run_dir, command="dpo", model=str(llama_dir), data=str(path), micro_batch=3,
                                   max_steps=2, lr=1e-2, precision="fp32", gpus="cpu"), "dpo")
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(records) == 2 and records[1]["rewards/margins"] > 0


def test_ratings_on_a_real_terminal(llama_dir, llama, tmp_path):
    """/good after a streamed reply on a pseudo-terminal: the notice, then the row in the default file of the
    checkpoint's folder (here a copy of the model folder); /help lists the rating commands."""
    import shutil

    pexpect = pytest.importorskip("pexpect")
    model, tokenizer = llama
    checkpoint = tmp_path / "model"
    shutil.copytree(llama_dir, checkpoint)
    child = spawn_chat(pexpect, checkpoint, tmp_path)
    try:
        child.expect_exact("you> ")
        child.send("hello there\r")
        history, _ = exchange(model, tokenizer, [], "hello there")
        child.expect_exact("\r\nyou> ")
        child.send("/good\r")
        path = checkpoint / "feedback.jsonl"
        child.expect_exact(f"(rated the reply good: 1 this chat, in {path})\r\nyou> ")
        child.send("/help\r")
        child.expect_exact("/good, /bad     rate the last reply")
        child.expect_exact("you> ")
        child.send("exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert rows(path) == [{"prompt": history[:1], "completion": history[1]["content"], "label": True}]

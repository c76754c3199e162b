"""`dialogtrain inspect`: its report on small files for the DialoGPT path (gpt2_dir) and a chat-template model
(llama_dir): counts, duplicates and overlap, nearest-rank length percentiles, what --max-length cuts, the
share of learned tokens, the marked example; preference data; bad input exits 2 with one error line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from dialogtrain.data.inspection import marked_text, percentile
from launcher.cli import cli
from tests.test_dedup import CHATS, write_chats, write_prefs


def inspect(*args: str):
    return CliRunner().invoke(cli, ["inspect", *args])


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_percentiles_are_nearest_rank():
    ordered = [3, 5, 9, 12]
    assert [percentile(ordered, p) for p in (50, 90, 95, 99)] == [5, 12, 12, 12]
    assert [percentile(list(range(1, 101)), p) for p in (50, 90, 95, 99)] == [50, 90, 95, 99]
    assert percentile([7], 50) == 7


def test_the_dialogpt_path_report(gpt2_dir, gpt2_tokenizer, tmp_path):
    data = write_chats(tmp_path / "chats.csv")  # 5 rows, 3 distinct: CHATS 0, 1 and 3
    held = write_chats(tmp_path / "held.jsonl", [CHATS[1], ("is it warm", "it is sunny")])
    result = inspect("--model", str(gpt2_dir), "--data", str(data), "--eval-data", str(held), "--show", "2")
    assert result.exit_code == 0, result.output
    # DialoGPT: every turn + EOS; the reply and its EOS are learned
    lengths = [len(enc(gpt2_tokenizer, u)) + len(enc(gpt2_tokenizer, a)) + 2 for u, a in (CHATS[0], CHATS[1], CHATS[3])]
    learned = [len(enc(gpt2_tokenizer, a)) + 1 for _, a in (CHATS[0], CHATS[1], CHATS[3])]
    ordered = sorted(lengths)  # 3 values: p50 is the 2nd, p90-p99 the 3rd
    assert result.output.splitlines()[:7] == [
        "kind: conversations (from the first row)",
        "train [chats] data: 5 rows from 1 file -> 5 conversations",
        "  formats: query/response (1 file)",
        "eval [held] data: 2 rows from 1 file -> 2 conversations",
        "  formats: messages (1 file)",
        "train: 5 conversations, 2 exact duplicates of 1 distinct one; dropped, the first of each kept "
        "(--keep-duplicates keeps them)",
        "eval: 2 conversations, no exact duplicates",
    ]
    assert "eval: 1 of 2 conversations also occurs in --data; left out of evaluation (--keep-overlap keeps them)" \
        in result.output
    assert (f"  train, 3 conversations: length p50 {ordered[1]}, p90 {ordered[2]}, p95 {ordered[2]}, "
            f"p99 {ordered[2]}, max {ordered[2]} tokens") in result.output
    assert "    at --max-length 512: 0 longer (0 lose turns or prompt tokens, 0 get a response cut), 0 with nothing " \
           "to learn" in result.output
    share = 100 * sum(learned) / sum(lengths)
    assert f"    learned: {share:.1f}% of the tokens ({sum(learned)} of {sum(lengths)})" in result.output
    assert "  eval, 1 conversation: length" in result.output
    examples = result.output.split("example ")[1:]
    assert len(examples) == 2 and "example 3" not in result.output
    assert examples[0] == ("1 of 4 (train, chats.csv; learned tokens [[in double brackets]]):\n"
                           "    hello there<|endoftext|>[[hi how are you<|endoftext|>]]\n")


def test_a_chat_template_model_report_and_what_max_length_cuts(llama_dir, llama_tokenizer, tmp_path):
    two_turns = [{"messages": [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                               {"role": "user", "content": u2}, {"role": "assistant", "content": a2}]}
                 for (u1, a1), (u2, a2) in [(CHATS[0], CHATS[1]), (CHATS[3], ("tell me a joke", "no"))]]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in two_turns))
    def rendered_length(messages: list[dict]) -> int:
        text = llama_tokenizer.apply_chat_template(messages, tokenize=False)
        return len(llama_tokenizer(text, add_special_tokens=False)["input_ids"])

    whole = [rendered_length(row["messages"]) for row in two_turns]
    last = [rendered_length(row["messages"][2:]) for row in two_turns]
    max_length = max(last)  # both fit only without their first exchange
    assert max_length < min(whole)
    result = inspect("--model", str(llama_dir), "--data", str(data), "--max-length", str(max_length))
    assert result.exit_code == 0, result.output
    assert f"  train, 2 conversations: length p50 {min(whole)}, p90 {max(whole)}, p95 {max(whole)}, " \
           f"p99 {max(whole)}, max {max(whole)} tokens" in result.output
    assert f"    at --max-length {max_length}: 2 longer (2 lose turns or prompt tokens, 0 get a response cut), " \
           "0 with nothing to learn" in result.output
    assert f"tokens ({llama_dir}, its chat template):" in result.output
    # the first example as trained: its last exchange, the reply and its <|im_end|> learned, not the newline
    assert result.output.split("example ")[1].splitlines()[1:] == [
        "    <|im_start|>user", "    what is your name<|im_end|>", "    <|im_start|>assistant",
        "    [[my name is bot<|im_end|>]]"]


def test_preference_data_shows_both_completions_marked(gpt2_dir, tmp_path):
    result = inspect("--model", str(gpt2_dir), "--data", str(write_prefs(tmp_path / "prefs.jsonl")), "--eval-split",
                     "0.5", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("kind: preference pairs (from the first row)\n")
    assert "train: 4 preference pairs, 1 exact duplicate of 1 distinct one" in result.output
    assert "holds out 1 of 3 preference pairs (--seed 3); no prompt is shared with training" in result.output
    example = result.output.split("example 1 of 3")[1].splitlines()
    assert example[1:] == ["  chosen:", "    what is your name<|endoftext|>[[my name is bot<|endoftext|>]]",
                           "  rejected:", "    what is your name<|endoftext|>[[go away<|endoftext|>]]"]


def test_bad_rows_are_all_counted_and_the_first_shown(gpt2_dir, tmp_path):
    data = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
            {"messages": "oops"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = inspect("--model", str(gpt2_dir), "--data", str(data))
    assert result.exit_code == 0, result.output
    assert "train [chats] data: 3 rows from 1 file -> 1 conversation; dropped 2 (1 empty assistant turn, " \
           "1 wrong type)" in result.output
    assert ("  bad rows: 2; training stops at the first of them unless --skip-bad-rows; the first:\n"
            f"    {data} line 2 field 'messages[1]': empty assistant turn\n"
            f"    {data} line 3 field 'messages': wrong type: expected a list, got string\n") in result.output
    skipped = inspect("--model", str(gpt2_dir), "--data", str(data), "--skip-bad-rows")
    assert "  bad rows: 2; dropped (--skip-bad-rows); the first:" in skipped.output


def test_colour_marks_learned_tokens_with_ansi(gpt2_tokenizer):
    ok = enc(gpt2_tokenizer, "ok")
    ids = enc(gpt2_tokenizer, "hi") + [gpt2_tokenizer.eos_token_id] + ok
    labels = [-100] * (len(ids) - len(ok)) + ok
    assert marked_text(gpt2_tokenizer, ids, labels, colour=True) == "hi<|endoftext|>\x1b[1;32mok\x1b[0m"
    assert marked_text(gpt2_tokenizer, ids, labels, colour=False) == "hi<|endoftext|>[[ok]]"


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.jsonl"], "error: missing.jsonl: no such file"),
    (["--data", "{data}", "--kind", "dpo"], "error: --kind must be auto or one of sft, preference, rating, got 'dpo'"),
    (["--data", "{data}", "--max-length", "4"], "--max-length must be at least 8, got 4"),
    (["--data", "{data}", "--eval-split", "2"], "--eval-split must be a fraction in [0, 1), got 2.0"),
    (["--data", "{data}", "--kind", "preference"], "holds conversations, this command trains on preference pairs"),
])
def test_bad_input_exits_2_with_one_clear_error(gpt2_dir, tmp_path, args, message):
    data = write_chats(tmp_path / "chats.jsonl")
    result = inspect("--model", str(gpt2_dir), *[a.format(data=data) for a in args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_inspect_keeps_torch_out_of_the_launcher_and_is_quick_on_the_corpus(gpt2_dir):
    import subprocess
    import sys
    import time

    from dialogtrain.demo import chatterbot_english

    started = time.perf_counter()
    result = inspect("--model", str(gpt2_dir), "--data", str(chatterbot_english()), "--show", "0")
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    assert "train: 2025 conversations, 1127 exact duplicates of 49 distinct ones (tech_support.yml 1040, " \
           "coding.yml 86, money.yml 1)" in result.output
    assert "  train, 898 conversations: length p50" in result.output
    assert seconds < 30 and not math.isnan(seconds)
    code = "import sys, launcher.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent).stdout.strip() == "False"

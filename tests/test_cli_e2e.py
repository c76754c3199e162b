"""The first workflow through the real command line: `dialogtrain sft` (torchrun, one CPU process,
DeepSpeed) on a dataset file, then `dialogtrain chat` on the result, and bad input on the way.

The in-process tests (test_sft.py) check the exported logits against the engine's own model; here
the whole chain runs as a user runs it, in subprocesses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dialogtrain.train.metrics import read_metrics
from tests.sft_harness import PAIRS, write_messages_jsonl, write_pairs_csv

FEW_PAIRS = PAIRS[:4]  # one global batch: every step sees every pair, so the model overfits them fast


def dialogtrain(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def train(model_dir: Path, data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    done = dialogtrain("sft", "--model", str(model_dir), "--data", str(data), "--output", str(run_dir),
                       "--gpus", "cpu", "--precision", "fp32", "--micro-batch", "4", "--log-every", "1", *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def assert_loss_falls(run_dir: Path, factor: float) -> list[dict]:
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert records[-1]["loss"] < records[0]["loss"] / factor, [r["loss"] for r in records]
    return records


@pytest.fixture(scope="module")
def overfit_gpt2_run(tmp_path_factory, gpt2_dir):
    """A tiny GPT-2 (no chat template, tied embeddings) overfit on four query/response rows of a CSV."""
    tmp = tmp_path_factory.mktemp("gpt2-cli")
    data = write_pairs_csv(tmp / "pairs.csv", FEW_PAIRS)
    run_dir = tmp / "run"
    done = train(gpt2_dir, data, run_dir, "--eval-data", str(data), "--keep-overlap", "--max-steps", "60", "--lr", "1e-2",
                 "--warmup-steps", "5", "--eval-every", "30")
    return run_dir, done


def test_gpt2_on_a_query_response_csv(overfit_gpt2_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, done = overfit_gpt2_run
    assert "train 4 rows -> 4 conversations" in done.stderr or "4 conversations" in done.stderr, done.stderr
    records = assert_loss_falls(run_dir, factor=10)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [30, 60] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert {"run.json", "ds_config.json", "command.sh", "metrics.jsonl", "final"} <= {
        p.name for p in run_dir.iterdir()}

    final = run_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    # The template added at export renders the DialoGPT format: every turn followed by EOS.
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi how are you"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == \
        "hello there<|endoftext|>hi how are you<|endoftext|>"


def test_chat_reproduces_a_training_reply_greedily(overfit_gpt2_run):
    run_dir, _ = overfit_gpt2_run
    query, response = FEW_PAIRS[1]
    once = dialogtrain("chat", str(run_dir), "--greedy", "--max-new-tokens", "16", "--prompt", query)
    assert once.returncode == 0, once.stderr
    assert once.stdout == response + "\n"
    # Piped stdin: one reply line per message, history kept, "exit" ends with code 0.
    piped = dialogtrain("chat", str(run_dir / "final"), "--greedy", "--max-new-tokens", "16",
                        stdin=f"{FEW_PAIRS[0][0]}\n{FEW_PAIRS[2][0]}\nexit\nnever read\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.splitlines()[0] == FEW_PAIRS[0][1]
    assert len(piped.stdout.splitlines()) == 2


@pytest.mark.slow
def test_llama_with_a_chat_template_on_messages_jsonl(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_messages_jsonl(tmp_path / "chats.jsonl")
    run_dir = tmp_path / "run"
    train(llama_dir, data, run_dir, "--max-steps", "12", "--lr", "1e-2")
    assert_loss_falls(run_dir, factor=1.4)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(llama_dir).chat_template
    start = AutoModelForCausalLM.from_pretrained(llama_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, start(ids).logits)  # it trained, and it loads


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_INPUTS = {
    # name: (file name, content, what the message must say)
    "missing column": ("pairs.csv", "query,response\nhello,hi\nhow are you,\n", ["line 3", "'response'"]),
    "empty file": ("chats.jsonl", "", ["chats.jsonl", "no rows"]),
    "malformed JSON line": (
        "chats.jsonl",
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "user", "content": "hi"}\n',
        ["line 2", "JSON"]),
    "roles out of order": (
        "chats.jsonl",
        '{"messages": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]}\n',
        ["line 1", "field 'messages[0]'", "roles out of order"]),
    "empty assistant turn": (
        "chats.jsonl",
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}\n',
        ["line 1", "field 'messages[1]'", "empty assistant turn"]),
}


# One case runs by default; the others are the same path with another message (slow: a process each).
@pytest.mark.parametrize("case", [case if i == 0 else pytest.param(case, marks=pytest.mark.slow)
                                  for i, case in enumerate(BAD_INPUTS)])
def test_bad_input_through_the_cli_names_file_row_and_field(case, gpt2_dir, tmp_path):
    name, content, expected = BAD_INPUTS[case]
    data = write(tmp_path / name, content)
    done = dialogtrain("sft", "--model", str(gpt2_dir), "--data", str(data), "--output", str(tmp_path / "run"),
                       "--gpus", "cpu")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    error = next(line for line in done.stderr.splitlines() if line.startswith("error: ") and str(data) in line)
    for part in expected:
        assert part in error, (part, error)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "final").exists()


def test_a_missing_model_is_one_clear_error(tmp_path):
    data = write_pairs_csv(tmp_path / "pairs.csv")
    done = dialogtrain("sft", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--output",
                       str(tmp_path / "run"), "--gpus", "cpu")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--model {tmp_path / 'no-such-model'}: no such folder" in done.stderr


def test_run_json_holds_every_resolved_option(overfit_gpt2_run):
    options = json.loads((overfit_gpt2_run[0] / "run.json").read_text())
    assert options["optim"]["lr"] == 1e-2 and options["schedule"]["max_steps"] == 60
    assert options["launch"]["gpus"] == "cpu" and options["world_size"] == 1


@pytest.mark.slow
def test_seed_dpo_workflow_user_assistant_prompts_on_orca_pairs(gpt2_dir, tmp_path):
    """The second workflow, on CPU: a GPT-2 chat model in the "user: ... / assistant: ..." format (made
    here by SFT with --chat-template user-assistant), then DPO on Intel/orca_dpo_pairs-schema rows with
    micro-batch 2 for 3 epochs (fp32: fp16 needs a GPU); the DPO export keeps the format for chat."""
    from transformers import AutoTokenizer

    from dialogtrain.data.templates import USER_ASSISTANT_CHAT_TEMPLATE
    from tests.test_dpo import QUESTIONS, write_orca_jsonl

    sft_run, dpo_run = tmp_path / "chat-gpt2", tmp_path / "chat-gpt2-dpo"
    train(gpt2_dir, write_pairs_csv(tmp_path / "pairs.csv"), sft_run, "--chat-template", "user-assistant",
          "--max-steps", "4", "--lr", "1e-2")
    done = dialogtrain("dpo", "--model", str(sft_run / "final"), "--data", str(write_orca_jsonl(tmp_path / "orca.jsonl",
                       QUESTIONS[:6])), "--output", str(dpo_run), "--gpus", "cpu", "--precision", "fp32",
                       "--micro-batch", "2", "--epochs", "3", "--lr", "1e-3", "--beta", "0.1")
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(dpo_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 10))  # 6 pairs / batch 2 x 3 epochs
    assert [r["epoch"] for r in records] == [0] * 3 + [1] * 3 + [2] * 3
    assert records[0]["loss"] == pytest.approx(0.6931472, abs=1e-6) and records[-1]["rewards/margins"] > 0
    tokenizer = AutoTokenizer.from_pretrained(dpo_run / "final")
    assert tokenizer.chat_template == USER_ASSISTANT_CHAT_TEMPLATE
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True) == "user: hi\nassistant:"
    reply = dialogtrain("chat", str(dpo_run), "--greedy", "--max-new-tokens", "8", "--prompt", "hello there")
    assert reply.returncode == 0 and reply.stdout.endswith("\n") and reply.stdout.count("\n") == 1, reply.stderr

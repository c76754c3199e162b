"""The terminal chat on tiny random checkpoints: exact greedy replies, history trimming, piped and
one-shot output, a real terminal (pexpect), --compare, and the errors a user can cause."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from dialogtrain.chat import (
    Bot,
    Sampling,
    generate_ids,
    generate_reply,
    load_chat_model,
    piped_session,
    run_chat,
    run_command,
    stream_reply,
    trim_history,
)
from dialogtrain.errors import UserError
from dialogtrain.formatting import render_prompt

REPO = Path(__file__).resolve().parent.parent

# Code run in a child process.
CHILD_PRELUDE = f"import sys; sys.path.insert(0, {str(REPO)!r}); from dialogtrain.chat import run_chat; "

HISTORY = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi how are you"},
           {"role": "user", "content": "what is your name"}]
GREEDY = Sampling(max_new_tokens=12, greedy=True)


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_chat_model(str(llama_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_chat_model(str(gpt2_dir), device="cpu", dtype="fp32")


@pytest.fixture
def runs(tmp_path, llama_dir, gpt2_dir) -> Path:
    """Two run folders whose final/ are the tiny checkpoints: runs/sft (llama) and runs/dpo (gpt2)."""
    for name, checkpoint in (("sft", llama_dir), ("dpo", gpt2_dir)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "final").symlink_to(checkpoint)
    return tmp_path


def reference_reply(model, tokenizer, messages, max_new_tokens=12) -> tuple[list[int], str]:
    """What plain `model.generate` gives, greedily, on the same rendered prompt."""
    ids = render_prompt(tokenizer, messages)
    output = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    new_ids = output[0, len(ids):].tolist()
    return new_ids, tokenizer.decode(new_ids, skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------------------------
# loading and generation


def test_tokenizer_without_template_gets_dialogpt_rendering(gpt2):
    _, tokenizer = gpt2
    ids = render_prompt(tokenizer, HISTORY)
    assert tokenizer.decode(ids) == "hello there<|endoftext|>hi how are you<|endoftext|>what is your name<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_tokenizer_template_is_kept(llama):
    _, tokenizer = llama
    text = tokenizer.decode(render_prompt(tokenizer, HISTORY[:1]))
    assert text == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("messages", [HISTORY[:1], HISTORY], ids=["first-turn", "with-history"])
def test_greedy_reply_equals_model_generate(request, name, messages):
    model, tokenizer = request.getfixturevalue(name)
    expected_ids, expected_text = reference_reply(model, tokenizer, messages)
    assert generate_ids(model, tokenizer, render_prompt(tokenizer, messages), GREEDY) == expected_ids
    assert generate_reply(model, tokenizer, messages, max_new_tokens=12, greedy=True) == expected_text


def test_streamed_reply_equals_plain_reply(llama):
    model, tokenizer = llama
    out = io.StringIO()
    reply, interrupted = stream_reply(model, tokenizer, render_prompt(tokenizer, HISTORY), GREEDY, out)
    assert not interrupted
    assert reply == reference_reply(model, tokenizer, HISTORY)[1] == out.getvalue().strip()


def test_stop_flag_ends_generation_after_one_token(llama):
    model, tokenizer = llama
    stop = threading.Event()
    stop.set()
    assert len(generate_ids(model, tokenizer, render_prompt(tokenizer, HISTORY), GREEDY, stop=stop)) == 1


def test_ctrl_c_stops_the_reply_not_the_program(llama):
    """A KeyboardInterrupt while streaming sets the stop flag; the reply so far is returned."""
    model, tokenizer = llama

    class InterruptedTerminal(io.StringIO):
        def write(self, text):
            raise KeyboardInterrupt

    sampling = Sampling(max_new_tokens=200, greedy=True)
    reply, interrupted = stream_reply(model, tokenizer, render_prompt(tokenizer, HISTORY), sampling,
                                      InterruptedTerminal())
    assert interrupted and isinstance(reply, str)


def test_seed_makes_sampling_reproducible(llama):
    model, tokenizer = llama
    replies = []
    for _ in range(2):
        torch.manual_seed(1234)
        replies.append(generate_reply(model, tokenizer, HISTORY, max_new_tokens=12, temperature=1.0))
    assert replies[0] == replies[1]


def test_sampling_options_are_checked_together():
    with pytest.raises(UserError) as err:
        Sampling(max_new_tokens=0, temperature=0.0, top_p=1.5, top_k=-1, repetition_penalty=0.0)
    for flag in ("--max-new-tokens", "--temperature", "--top-p", "--top-k", "--repetition-penalty"):
        assert flag in str(err.value)
    assert Sampling(temperature=0.0, greedy=True).generate_kwargs() == {"max_new_tokens": 256, "do_sample": False}


# ----------------------------------------------------------------------------------------------------
# history


def test_trim_history_drops_oldest_exchanges_and_keeps_system(llama):
    _, tokenizer = llama
    system = {"role": "system", "content": "you are a helpful bot"}
    messages = [system] + HISTORY + [{"role": "assistant", "content": "my name is bot"},
                                     {"role": "user", "content": "tell me a joke please"}]
    assert trim_history(tokenizer, messages, budget=10_000) == messages
    last_exchange = [system] + messages[3:]
    assert trim_history(tokenizer, messages, budget=len(render_prompt(tokenizer, last_exchange))) == last_exchange
    assert trim_history(tokenizer, messages, budget=1) == [system, messages[-1]]


def test_long_conversation_is_trimmed_to_the_context_and_still_answered(llama, monkeypatch, capsys):
    model, tokenizer = llama
    monkeypatch.setattr(model.config, "max_position_embeddings", 48)  # 48 - 8 new tokens = 40 prompt tokens
    sampling = Sampling(max_new_tokens=8, greedy=True)
    bot = Bot("tiny", model, tokenizer, system="you are a bot")
    for text in ["hello there how are you today", "what is the weather like", "tell me a joke please",
                 "why did the chicken cross the road"]:
        bot.answer(text, sampling)
        assert len(render_prompt(tokenizer, bot.history[:-1])) <= 40
    assert bot.history[0] == {"role": "system", "content": "you are a bot"}
    assert bot.history[1] != {"role": "user", "content": "hello there how are you today"}
    assert bot.history[-2:][0] == {"role": "user", "content": "why did the chicken cross the road"}
    assert bot.history[-1]["role"] == "assistant"
    assert capsys.readouterr().err.count("outgrew the context") == 1


def test_message_longer_than_the_context_is_cut_and_answered(llama, monkeypatch, capsys):
    model, tokenizer = llama
    monkeypatch.setattr(model.config, "max_position_embeddings", 20)
    bot = Bot("tiny", model, tokenizer)
    ids, _ = bot.prompt_for("the quick brown fox jumps over the lazy dog " * 3, GREEDY)
    assert len(ids) == 20 - 12 and bot.history == []
    assert "does not fit" in capsys.readouterr().err
    assert isinstance(bot.answer("tell me a joke please", Sampling(max_new_tokens=4, greedy=True)), str)


# ----------------------------------------------------------------------------------------------------
# front ends


def test_piped_stdin_prints_one_line_per_message_and_nothing_else(llama_dir, llama):
    """A real pipe into a child process: stdout holds exactly the replies, one line each."""
    code = CHILD_PRELUDE + f"sys.exit(run_chat({str(llama_dir)!r}, greedy=True, max_new_tokens=10, device='cpu'))"
    done = subprocess.run([sys.executable, "-c", code], input="hello there\nwhat is your name\n\nexit\nignored\n",
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert len(lines) == 4 and lines[2] == "" and lines[3] == ""  # 3 answers (a blank line for the blank input)
    model, tokenizer = llama
    first = generate_reply(model, tokenizer, HISTORY[:1], max_new_tokens=10, greedy=True)
    assert lines[0] == " ".join(first.splitlines())


def test_prompt_prints_one_line_and_exits_0(llama_dir, llama, capsys):
    assert run_chat(str(llama_dir), prompt="hello there", greedy=True, max_new_tokens=10, device="cpu") == 0
    out = capsys.readouterr().out
    model, tokenizer = llama
    expected = generate_reply(model, tokenizer, HISTORY[:1], max_new_tokens=10, greedy=True)
    assert out == " ".join(expected.splitlines()) + "\n"


def test_compare_answers_with_both_checkpoints(runs, llama, gpt2, monkeypatch, capsys):
    replies = {name: generate_reply(*pair, HISTORY[:1], max_new_tokens=10, greedy=True)
               for name, pair in (("sft", llama), ("dpo", gpt2))}
    kwargs = dict(compare=str(runs / "dpo"), greedy=True, max_new_tokens=10, device="cpu")
    assert run_chat(str(runs / "sft"), prompt="hello there", **kwargs) == 0
    assert capsys.readouterr().out.splitlines() == [f"sft: {replies['sft']}", f"dpo: {replies['dpo']}"]

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nwhat is your name\nquit\n"))
    assert run_chat(str(runs / "sft"), **kwargs) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["sft", "dpo", "sft", "dpo"]
    assert lines[:2] == [f"sft: {replies['sft']}", f"dpo: {replies['dpo']}"]


def test_each_compared_bot_keeps_its_own_history(llama, gpt2):
    bots = [Bot("sft", *llama), Bot("dpo", *gpt2)]
    out = io.StringIO()
    piped_session(bots, GREEDY, io.StringIO("hello there\nwhat is your name\n"), out)
    for bot in bots:
        assert [m["role"] for m in bot.history] == ["user", "assistant", "user", "assistant"]
    assert bots[0].history[1]["content"] != bots[1].history[1]["content"]


def test_commands_reset_system_history_save(llama, tmp_path):
    bot = Bot("tiny", *llama)
    out = io.StringIO()
    bot.answer("hello there", GREEDY)
    run_command("/save " + str(tmp_path / "chat.json"), [bot], out)
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in saved] == ["user", "assistant"] and saved[0]["content"] == "hello there"
    run_command("/system you are a pirate", [bot], out)
    assert bot.history == [{"role": "system", "content": "you are a pirate"}]
    run_command("/reset", [bot], out)
    assert bot.history == [{"role": "system", "content": "you are a pirate"}]
    run_command("/system", [bot], out)
    assert bot.history == [] and bot.system is None
    run_command("/nonsense", [bot], out)
    assert "unknown command" in out.getvalue()


def test_real_terminal_session(llama_dir, llama):
    """pexpect drives a child on a pseudo-terminal: prompt, streamed reply, /history, /reset, exit."""
    pexpect = pytest.importorskip("pexpect")
    code = CHILD_PRELUDE + f"sys.exit(run_chat({str(llama_dir)!r}, greedy=True, max_new_tokens=10, device='cpu'))"
    child = pexpect.spawn(sys.executable, ["-c", code], cwd=str(REPO), encoding="utf-8", codec_errors="replace",
                          timeout=240, dimensions=(40, 200))
    try:
        child.expect_exact("you> ")
        child.sendline("hello there")
        child.expect_exact("bot> ")
        child.expect_exact("you> ")
        streamed = child.before.strip()
        expected = generate_reply(*llama, HISTORY[:1], max_new_tokens=10, greedy=True)
        assert streamed == expected.replace("\n", "\r\n")
        child.sendline("/history")
        child.expect_exact("user: hello there")
        child.expect_exact("assistant: ")
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.sendline("/history")
        child.expect_exact("(empty)")
        child.expect_exact("you> ")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


# ----------------------------------------------------------------------------------------------------
# errors a user can cause


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        run_chat(str(tmp_path / "nowhere"))


def test_folder_without_config_or_weights_is_a_user_error(tmp_path, llama_dir):
    with pytest.raises(UserError, match="no config.json"):
        run_chat(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="dialogtrain export"):
        run_chat(str(tmp_path))
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(UserError, match="safetensors"):
        run_chat(str(tmp_path))


def test_reply_longer_than_the_context_is_refused_at_start(gpt2_dir):
    with pytest.raises(UserError, match="--max-new-tokens 256: leaves no room .* context of 128"):
        run_chat(str(gpt2_dir), max_new_tokens=256, prompt="hello", device="cpu")


def test_bad_dtype_is_a_user_error(llama_dir):
    with pytest.raises(UserError, match="--dtype"):
        load_chat_model(str(llama_dir), device="cpu", dtype="int3")


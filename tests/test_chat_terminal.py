"""`dialogtrain chat` in real child processes: on a pseudo-terminal driven by pexpect (streamed replies
read from the screen, readline editing and history, /prompt, /reset, Ctrl-C, exit code 0), and with
stdin and stdout as pipes (replies only on stdout, one line per message).

The terminal child slows every forward pass of the tiny Llama by SLOW_TOKEN_S, so that a reply takes
visibly long: the test sees its first token long before its end (streaming) and has time to press
Ctrl-C in the middle of one. A second child also idles after drawing each prompt, to press Ctrl-C at
the moment readline used to lose it, over and over.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dialogtrain.chat.generate import load_chat_model, printable
from dialogtrain.data.encode import render_prompt

REPO = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 40
SLOW_TOKEN_S = 0.03

# `dialogtrain chat ARGS...` with a slowed model; argv after -c are the chat arguments.
SLOW_CHAT = f"""
import sys, time
from transformers import LlamaForCausalLM
forward = LlamaForCausalLM.forward
def slow_forward(self, *args, **kwargs):
    time.sleep({SLOW_TOKEN_S})
    return forward(self, *args, **kwargs)
LlamaForCausalLM.forward = slow_forward
from launcher.cli import main
sys.argv = ["dialogtrain", "chat", *sys.argv[1:]]
main()
"""


# Prepended to SLOW_CHAT: after drawing each prompt, readline idles PROMPT_IDLE_US in C (running no Python,
# so no signal handler either) before it waits for a key. That is the moment, between prompt and wait,
# where a Ctrl-C only marked Python's handler pending and input() kept waiting for a key: a test that
# presses Ctrl-C as soon as it sees the prompt hits it every time instead of once in a long while.
PROMPT_IDLE_US = 300_000
IDLE_AFTER_PROMPT = f"""
import ctypes, functools, readline
readline.set_pre_input_hook(functools.partial(ctypes.CDLL(None).usleep, {PROMPT_IDLE_US}))
"""


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_chat_model(str(llama_dir), device="cpu", dtype="fp32")


def spawn_chat(pexpect, llama_dir, tmp_path, prelude: str = ""):
    """`dialogtrain chat` on the tiny Llama (slowed, greedy, fp32 on the CPU) in a pseudo-terminal."""
    (tmp_path / "inputrc").write_text("set enable-bracketed-paste off\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TERM": "xterm", "INPUTRC": str(tmp_path / "inputrc"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [str(llama_dir), "--greedy", "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu", "--dtype", "fp32"]
    return pexpect.spawn(sys.executable, ["-c", prelude + SLOW_CHAT, *args], cwd=str(REPO), env=env, encoding="utf-8",
                         codec_errors="replace", timeout=240, dimensions=(50, 250))


def greedy_ids(model, tokenizer, messages: list[dict], max_new_tokens: int) -> list[int]:
    """model.generate's greedy continuation of the rendered `messages`."""
    import torch

    ids = render_prompt(tokenizer, messages)
    output = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return output[0, len(ids):].tolist()


def exchange(model, tokenizer, history: list[dict], text: str) -> tuple[list[dict], str]:
    """(history after the bot answers `text`, the reply as the terminal shows it: CRLF line ends)."""
    history = [*history, {"role": "user", "content": text}]
    new_ids = greedy_ids(model, tokenizer, history, MAX_NEW_TOKENS)
    reply = tokenizer.decode(new_ids, skip_special_tokens=True)
    history.append({"role": "assistant", "content": reply.strip()})
    return history, printable(reply).replace("\n", "\r\n")


def on_terminal(text: str) -> str:
    return printable(text).replace("\n", "\r\n")


def read_reply(child) -> tuple[str, float]:
    """The streamed reply after "bot> ", and the seconds between its first visible character and its end."""
    child.expect_exact("bot> ")
    child.expect(r"\S")
    first_seen, start = time.monotonic(), child.after
    child.expect_exact("\r\nyou> ")
    return start + child.before, time.monotonic() - first_seen


def test_real_terminal_session(llama_dir, llama, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    model, tokenizer = llama
    child = spawn_chat(pexpect, llama_dir, tmp_path)
    try:
        child.expect_exact("you> ")
        # readline line editing: a typo rubbed out with backspace
        child.send("hello therx\x7fe\r")
        history, expected = exchange(model, tokenizer, [], "hello there")
        shown, streaming_s = read_reply(child)
        assert shown == expected
        # streamed token by token: the end came (MAX_NEW_TOKENS - 1) slowed tokens after the first one
        assert streaming_s > 0.5 * (MAX_NEW_TOKENS - 1) * SLOW_TOKEN_S

        # readline history: the up arrow brings back "hello there"; the reply sees the first exchange
        child.send("\x1b[A\r")
        history, expected = exchange(model, tokenizer, history, "hello there")
        assert read_reply(child)[0] == expected
        child.sendline("/prompt")  # the rendered prompt of the last reply, chat template and all
        child.expect_exact(on_terminal(tokenizer.decode(render_prompt(tokenizer, history[:-1]))) + "you> ")

        child.sendline("/reset")
        child.expect_exact("(conversation cleared)\r\nyou> ")
        history, expected = exchange(model, tokenizer, [], "what is your name")
        child.sendline("what is your name")
        assert read_reply(child)[0] == expected
        child.sendline("/prompt")  # only the message after /reset
        child.expect_exact("\r\n<|im_start|>user\r\nwhat is your name<|im_end|>\r\n<|im_start|>assistant\r\n"
                           "you> ")

        # Ctrl-C stops the reply in progress, the chat goes on with what was shown
        _, full = exchange(model, tokenizer, history, "tell me a joke please")
        child.sendline("tell me a joke please")
        child.expect_exact("bot> ")
        child.expect(r"\S")
        first_seen = child.after
        child.sendintr()
        child.expect_exact(" [stopped]\r\nyou> ")
        partial = (first_seen + child.before).replace("^C", "")  # the terminal echoes Ctrl-C as ^C
        assert 0 < len(partial) < len(full) // 2 and full.startswith(partial.rstrip("\ufffd"))
        # Ctrl-C at the prompt does not end the chat either
        child.sendintr()
        child.expect_exact("(Ctrl-D or exit to leave)")
        child.sendline("/history")
        child.expect_exact("user: tell me a joke please\r\nassistant: ")
        child.expect_exact("you> ")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def stop_replies_then_ctrl_c_at_the_prompt(pexpect, child, times: int) -> None:
    """Stop a reply with Ctrl-C, then press Ctrl-C again the moment the prompt is back, `times` times;
    then leave. Each second Ctrl-C must be answered at the prompt's next wake-up (50 ms): lost, it would
    wait for a key press (TIMEOUT)."""
    try:
        child.expect_exact("you> ")
        for _ in range(times):
            child.sendline("tell me a joke please")
            child.expect_exact("bot> ")
            child.expect(r"\S")
            child.sendintr()
            child.expect_exact(" [stopped]\r\nyou> ", timeout=20)
            child.sendintr()
            child.expect_exact("(Ctrl-D or exit to leave)\r\nyou> ", timeout=20)
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_ctrl_c_as_the_prompt_returns_is_never_lost(llama_dir, tmp_path):
    """25 times: every second Ctrl-C is answered at once, none waits for a key press (each lands in
    readline's idle moment between drawing the prompt and waiting for a key, see IDLE_AFTER_PROMPT)."""
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(pexpect, llama_dir, tmp_path, prelude=IDLE_AFTER_PROMPT)
    stop_replies_then_ctrl_c_at_the_prompt(pexpect, child, times=25)


# What a chat may inherit from whoever started it: SIGINT ignored (a shell without job control starts
# background commands so, `dialogtrain chat ... &` in a script; Python then installs no Ctrl-C handler),
# or SIGINT and SIGALRM blocked.
INHERITED = {"sigint-ignored": "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n",
             "blocked": "import signal; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGALRM})\n"}


@pytest.mark.parametrize("inherited", INHERITED)
def test_ctrl_c_reaches_a_chat_that_inherited_it_ignored_or_blocked(llama_dir, tmp_path, inherited):
    """Chat restores the two signals it lives on, so a Ctrl-C both stops a reply and is answered at the
    prompt."""
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(pexpect, llama_dir, tmp_path, prelude=INHERITED[inherited] + IDLE_AFTER_PROMPT)
    stop_replies_then_ctrl_c_at_the_prompt(pexpect, child, times=3)


def test_piped_stdin_prints_one_line_per_message_and_nothing_else(llama_dir, llama):
    """A real pipe into `python -m launcher.cli chat`: stdout holds exactly the replies, one line each; a blank
    line answers a blank line; exit stops reading."""
    model, tokenizer = llama
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "chat", str(llama_dir), "--greedy",
                           "--max-new-tokens", "10", "--device", "cpu"],
                          input="hello there\nwhat is your name\n\nexit\nignored\n", capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    first = tokenizer.decode(greedy_ids(model, tokenizer, [{"role": "user", "content": "hello there"}], 10),
                             skip_special_tokens=True).strip()
    history = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "what is your name"}]
    second = tokenizer.decode(greedy_ids(model, tokenizer, history, 10), skip_special_tokens=True).strip()
    assert done.stdout == "\n".join([" ".join(first.splitlines()), " ".join(second.splitlines()), "", ""])

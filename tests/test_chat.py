"""The chat on tiny random checkpoints, in process: exact greedy replies, token-by-token streaming,
Ctrl-C, history trimming, commands, piped and one-shot output, --compare, dtype and device choice,
safetensors only, and the errors a user can cause (through the click command: exit 2, no traceback).
The real terminal (pexpect) and a real pipe are in test_chat_terminal.py."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dialogtrain.chat.generate as generate_module
import dialogtrain.chat.session as session_module
from dialogtrain.chat.generate import (
    Sampling,
    TokenStreamer,
    generate_ids,
    generate_reply,
    load_chat_model,
    printable,
    resolve_device,
    resolve_dtype,
    stream_reply,
    trim_history,
)
from dialogtrain.chat.session import Bot, chat_session, piped_session, run_chat, run_command
from dialogtrain.data.encode import render_prompt
from dialogtrain.errors import UserError
from launcher.cli import cli

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
    assert reply == reference_reply(model, tokenizer, HISTORY)[1]
    assert out.getvalue() == on_screen(model, tokenizer, HISTORY, 12)


def streamed_chunks(tokenizer, ids: list[int]) -> list[str]:
    """What `TokenStreamer` shows when `ids` arrive one at a time after a one-token prompt."""
    shown = []
    streamer = TokenStreamer(tokenizer, shown.append)
    streamer.put(torch.tensor([[0]]))  # the prompt, skipped
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    return [chunk for chunk in shown if chunk]


def test_streamer_yields_text_after_every_token(llama_tokenizer):
    tokenizer = llama_tokenizer
    ids = tokenizer.encode("hello there how are you today", add_special_tokens=False)
    assert len(ids) > 3
    per_token = [tokenizer.decode(ids[:i + 1])[len(tokenizer.decode(ids[:i])):] for i in range(len(ids))]
    assert streamed_chunks(tokenizer, ids) == per_token  # not word by word: one chunk per token


def test_streamer_waits_for_whole_characters_and_trailing_spaces(llama_tokenizer):
    """Byte-level tokens of multi-byte characters are held until the character is complete."""
    tokenizer = llama_tokenizer
    text = "hello 你好 été\nthe  fox"
    ids = tokenizer.encode(text, add_special_tokens=False)
    chunks = streamed_chunks(tokenizer, ids)
    assert "".join(chunks) == text
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert not any(chunk.endswith(" ") for chunk in chunks)  # a space waits for the next word
    assert any("你" in chunk for chunk in chunks) and len(chunks) > 4


def test_terminal_shows_control_characters_escaped():
    assert printable("a\tb\nc\x1b[2J\x07\x7f\x9b é 你") == "a\tb\nc\\x1b[2J\\x07\\x7f\\x9b é 你"


def test_stop_flag_ends_generation_after_one_token(llama):
    model, tokenizer = llama
    stop = threading.Event()
    stop.set()
    assert len(generate_ids(model, tokenizer, render_prompt(tokenizer, HISTORY), GREEDY, stop=stop)) == 1


def test_sigint_while_streaming_stops_the_reply_not_the_program(llama):
    """A real SIGINT at the first streamed token: the handler sets the stop flag, generation ends a token
    or two later, the reply so far is returned, and the previous SIGINT handler is back."""
    model, tokenizer = llama
    sampling = Sampling(max_new_tokens=60, greedy=True)
    ids = render_prompt(tokenizer, HISTORY)
    full = generate_ids(model, tokenizer, ids, sampling)
    assert len(full) == 60  # the random model never says EOS here, so a shorter reply was stopped

    class Terminal(io.StringIO):
        def write(self, text):
            if not self.getvalue():
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(text)

    handler = signal.getsignal(signal.SIGINT)
    terminal = Terminal()
    reply, interrupted = stream_reply(model, tokenizer, ids, sampling, terminal)
    assert interrupted
    assert signal.getsignal(signal.SIGINT) is handler
    full_text = tokenizer.decode(full, skip_special_tokens=True).strip()
    assert 0 < len(reply) < len(full_text) // 2
    assert full_text.startswith(reply.rstrip("\ufffd"))
    assert printable(full_text).startswith(terminal.getvalue().strip())


def test_keyboard_interrupt_while_streaming_stops_the_reply(llama):
    """A KeyboardInterrupt raised anyway (off the main thread there is no handler) sets the flag too."""
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
    assert [m["role"] for m in bot.history[1:]] == ["user", "assistant"] * ((len(bot.history) - 1) // 2)
    # the last answer is model.generate's, token for token, on the trimmed history
    assert bot.history[-1]["content"] == reference_reply(model, tokenizer, bot.history[:-1], max_new_tokens=8)[1]
    assert bot.last_prompt_ids == render_prompt(tokenizer, bot.history[:-1])
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
    run_command("/save", [bot], out)
    assert "(usage: /save FILE)" in out.getvalue()
    run_command("/nonsense", [bot], out)
    assert "unknown command" in out.getvalue()


def typed(monkeypatch, lines: list[str]) -> None:
    """`input()` returns `lines` one by one, then raises EOFError (Ctrl-D)."""
    pending = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(pending)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)


def on_screen(model, tokenizer, messages, max_new_tokens=10) -> str:
    """How model.generate's greedy reply to `messages` looks when streamed to a terminal."""
    new_ids, _ = reference_reply(model, tokenizer, messages, max_new_tokens)
    return printable(tokenizer.decode(new_ids, skip_special_tokens=True))


def test_session_streams_replies_and_prompt_shows_the_rendered_history(llama, monkeypatch):
    """The interactive loop: each reply is model.generate's on the rendered history; /prompt prints that
    prompt with the chat template; /reset empties it; quit ends with 0."""
    model, tokenizer = llama
    first = reference_reply(model, tokenizer, HISTORY[:1], 10)[1]
    history = [HISTORY[0], {"role": "assistant", "content": first}, HISTORY[2]]
    typed(monkeypatch, ["hello there", "what is your name", "/prompt", "/reset", "what is your name", "/prompt",
                        "quit", "never read"])
    out = io.StringIO()
    assert chat_session([Bot("tiny", model, tokenizer)], Sampling(max_new_tokens=10, greedy=True), out) == 0
    assert out.getvalue() == (
        "chatting with tiny; /help for commands, exit or Ctrl-D to leave\n"
        f"bot> {on_screen(model, tokenizer, HISTORY[:1])}\n"
        f"bot> {on_screen(model, tokenizer, history)}\n"
        + printable(tokenizer.decode(render_prompt(tokenizer, history)))
        + "(conversation cleared)\n"
        f"bot> {on_screen(model, tokenizer, HISTORY[2:])}\n"
        "<|im_start|>user\nwhat is your name<|im_end|>\n<|im_start|>assistant\n")


def test_ctrl_c_while_loading_leaves_quietly_with_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(session_module, "load_bots", interrupted)
    assert run_chat("CKPT") == 130
    assert capsys.readouterr() == ("", "\n")


def test_session_ends_with_0_on_ctrl_d(llama, monkeypatch):
    typed(monkeypatch, [])
    out = io.StringIO()
    assert chat_session([Bot("tiny", *llama)], GREEDY, out) == 0
    assert out.getvalue().endswith("leave\n\n")


def test_session_compare_labels_both_replies(llama, gpt2, monkeypatch):
    replies = [reference_reply(*pair, HISTORY[:1], 10)[1] for pair in (llama, gpt2)]
    typed(monkeypatch, ["hello there", "/history", "exit"])
    out = io.StringIO()
    assert chat_session([Bot("sft", *llama), Bot("dpo", *gpt2)], Sampling(max_new_tokens=10, greedy=True), out) == 0
    assert out.getvalue() == (
        "chatting with sft, dpo; /help for commands, exit or Ctrl-D to leave\n"
        f"[sft] {on_screen(*llama, HISTORY[:1])}\n[dpo] {on_screen(*gpt2, HISTORY[:1])}\n"
        f"== sft ==\nuser: hello there\nassistant: {printable(replies[0])}\n"
        f"== dpo ==\nuser: hello there\nassistant: {printable(replies[1])}\n")


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


def test_bad_device_is_a_user_error():
    with pytest.raises(UserError, match="--device gpu: not a device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda:1: CUDA is not available"):
            resolve_device("cuda:1")
    assert resolve_device("cpu") == "cpu"


def test_auto_dtype_is_bf16_where_the_cpu_computes_it(monkeypatch, capsys):
    monkeypatch.setattr(generate_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and capsys.readouterr().err == ""
    monkeypatch.setattr(generate_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("fp16", "cpu") == torch.float16 and capsys.readouterr().err == ""
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert "bf16 is emulated and far slower than fp32" in capsys.readouterr().err


@pytest.mark.parametrize("capability, auto, bf16_ok", [((9, 0), torch.bfloat16, True), ((8, 0), torch.bfloat16, True),
                                                    ((7, 5), torch.float16, False), ((7, 0), torch.float16, False)])
def test_dtype_on_a_gpu_follows_its_compute_capability(monkeypatch, capability, auto, bf16_ok):
    """V100/T4 (7.x) emulate bf16, and torch.cuda.is_bf16_supported() still says yes: the capability decides."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_dtype("auto", "cuda:1") == auto and asked == ["cuda:1"]
    assert resolve_dtype("fp16", "cuda") == torch.float16 and resolve_dtype("fp32", "cuda") == torch.float32
    if bf16_ok:
        assert resolve_dtype("bf16", "cuda") == torch.bfloat16
    else:
        with pytest.raises(UserError, match=rf"--dtype bf16: this GPU \(compute capability {capability[0]}\.{capability[1]}\) "
                                            r"has no bf16 tensor cores"):
            resolve_dtype("bf16", "cuda")


def test_bf16_chat_on_cpu_equals_bf16_generate(llama_dir):
    model, tokenizer = load_chat_model(str(llama_dir), device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16
    _, expected = reference_reply(model, tokenizer, HISTORY[:1], 8)
    assert generate_reply(model, tokenizer, HISTORY[:1], max_new_tokens=8, greedy=True) == expected


def test_pickle_only_checkpoint_is_refused(tmp_path, llama_dir, llama):
    folder = tmp_path / "pickled"
    shutil.copytree(llama_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(llama[0].state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"only pickled weights \(pytorch_model.bin\); chat loads safetensors only"):
        run_chat(str(folder), prompt="hello", device="cpu")


def test_model_code_runs_only_with_trust_remote_code(tmp_path, llama_dir):
    """A checkpoint whose config points at its own Python file: refused with a hint; the file never ran."""
    folder = tmp_path / "custom"
    shutil.copytree(llama_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-chat", auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                      "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="needs --trust-remote-code"):
        load_chat_model(str(folder), device="cpu")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------
# the click command: user errors end with exit code 2 and one line, options reach run_chat


def invoke(*args: str, stdin: str = ""):
    return CliRunner().invoke(cli, ["chat", *args], input=stdin)


def test_cli_missing_checkpoint_exits_2_without_traceback(tmp_path):
    result = invoke(str(tmp_path / "nowhere"))
    assert result.exit_code == 2
    assert result.stderr == f"error: checkpoint {tmp_path / 'nowhere'}: no such folder\n"
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--temperature", "0"], "--temperature 0.0: must be > 0 (use --greedy for deterministic replies)"),
    (["--top-p", "1.5"], "Invalid value for '--top-p'"),
    (["--dtype", "int8"], "Invalid value for '--dtype'"),
    (["--device", "gpu"], "--device gpu: not a device"),
])
def test_cli_bad_flag_exits_2_naming_it(llama_dir, args, message):
    result = invoke(str(llama_dir), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_cli_prompt_prints_the_reply_only(llama_dir, llama):
    expected = generate_reply(*llama, HISTORY[:1], max_new_tokens=10, greedy=True)
    result = invoke(str(llama_dir), "--prompt", "hello there", "--greedy", "--max-new-tokens", "10", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout == " ".join(expected.splitlines()) + "\n"


def test_cli_passes_every_option_and_trusts_no_code_by_default(monkeypatch):
    calls = []
    monkeypatch.setattr(session_module, "run_chat", lambda checkpoint, **options: calls.append(options) or 0)
    assert invoke("CKPT").exit_code == 0
    assert calls[0]["trust_remote_code"] is False and calls[0]["dtype"] == "auto" and calls[0]["device"] == "auto"
    args = ["--max-new-tokens", "7", "--temperature", "0.5", "--top-p", "0.8", "--top-k", "3",
            "--repetition-penalty", "1.2", "--greedy", "--seed", "5", "--system", "be brief", "--device", "cpu",
            "--dtype", "bf16", "--prompt", "hi", "--compare", "OTHER", "--trust-remote-code", "--feedback", "F.jsonl", "--adapter", "ADAPTER"]
    assert invoke("CKPT", *args).exit_code == 0
    assert calls[1] == dict(max_new_tokens=7, temperature=0.5, top_p=0.8, top_k=3, repetition_penalty=1.2,
                            greedy=True, seed=5, system="be brief", device="cpu", dtype="bf16", prompt="hi",
                            compare="OTHER", trust_remote_code=True, feedback="F.jsonl", adapter="ADAPTER")


"""The `dialogtrain chat` session: bots keeping their histories, talked to on a terminal, a pipe or once.

    dialogtrain chat RUN                     # RUN/final/, or any Hugging Face folder, or a .gguf file
    echo "hello" | dialogtrain chat RUN      # scripting: one reply line per input line, nothing else on stdout
    dialogtrain chat RUN --prompt "hello"    # one answer, then exit
    dialogtrain chat runs/sft --compare runs/dpo
    dialogtrain chat RUN --feedback ratings.jsonl   # /good, /bad (and /prefer NAME) append training rows there

Interactive replies stream token by token; Ctrl-C stops the reply in progress, and at the prompt it
says how to leave. When the history outgrows the context the oldest exchanges are dropped and the
user is told once. Replies themselves come from `generate`.

Read top to bottom: a bot and its conversation, the front ends (interactive session, its commands,
piped lines), and `run_chat`, which the CLI calls.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dialogtrain.chat.feedback import FEEDBACK_COMMANDS, Feedback
from dialogtrain.chat.feedback import HELP as FEEDBACK_HELP
from dialogtrain.chat.generate import (
    Sampling,
    checkpoint_name,
    context_budget,
    decode_reply,
    fit_prompt,
    generate_ids,
    load_chat_model,
    notify,
    printable,
    stream_reply,
)

EXIT_WORDS = ("exit", "quit")
HELP = """commands:
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message and start over (/system alone removes it)
  /history        print the conversation
  /prompt         print the last prompt exactly as the model saw it (rendered with the chat template)
  /save FILE      write the conversation to FILE as JSON messages
{feedback}
  /help           this list
  exit, quit, Ctrl-D   leave;  Ctrl-C stops a reply in progress"""

# How often the prompt wakes to handle a Ctrl-C that its wait missed (see `ctrl_c_reaches_input`).
PROMPT_WAKE_S = 0.05


# ----------------------------------------------------------------------------------------------------
# a bot and its conversation


@dataclass
class Bot:
    """One checkpoint in the chat: model, tokenizer and its own history (system message first, if any)."""

    name: str
    model: Any
    tokenizer: Any
    system: str | None = None
    history: list[dict] = field(default_factory=list)
    told_about_trimming: bool = False
    last_prompt_ids: list[int] = field(default_factory=list)  # what the model saw last, for /prompt

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; the system message stays."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def set_system(self, system: str | None) -> None:
        self.system = system or None
        self.reset()

    def prompt_for(self, user_text: str, sampling: Sampling) -> tuple[list[int], list[dict]]:
        """(prompt ids, history including the user message, trimmed to the context); says so once.

        The bot's own history only changes once a reply exists, so a failed or refused generation
        never leaves a dangling user turn behind.
        """
        budget = context_budget(self.model, self.tokenizer, sampling.max_new_tokens)
        history = [*self.history, {"role": "user", "content": user_text}]
        ids, kept = fit_prompt(self.tokenizer, history, budget)
        if len(kept) < len(history) and not self.told_about_trimming:
            notify(f"[{self.name}] the conversation outgrew the context ({budget} prompt tokens): "
                   "dropping the oldest exchanges from now on (/reset starts over)")
            self.told_about_trimming = True
        if len(ids) > budget:
            notify(f"[{self.name}] the message does not fit in the context: only its last {budget} prompt "
                   "tokens are used")
        return ids[-budget:], kept

    def answer(self, user_text: str, sampling: Sampling, stream_to: TextIO | None = None, label: str = "") -> str:
        """The reply to `user_text`, recorded in the history. With `stream_to`, `label` then the reply are
        written there as it is generated (after any notice about the context, which goes to stderr);
        a reply stopped by Ctrl-C ends with " [stopped]" there and is kept as far as it went."""
        ids, history = self.prompt_for(user_text, sampling)
        self.last_prompt_ids = ids
        if stream_to is None:
            reply = decode_reply(self.tokenizer, generate_ids(self.model, self.tokenizer, ids, sampling))
        else:
            stream_to.write(label)
            stream_to.flush()
            reply, interrupted = stream_reply(self.model, self.tokenizer, ids, sampling, stream_to)
            if interrupted:
                stream_to.write(" [stopped]")
        self.history = [*history, {"role": "assistant", "content": reply}]
        return reply


def one_line(reply: str) -> str:
    return " ".join(reply.splitlines())


# ----------------------------------------------------------------------------------------------------
# front ends


@contextmanager
def ctrl_c_reaches_input(period_s: float = PROMPT_WAKE_S) -> Iterator[None]:
    """Inside the block, a do-nothing SIGALRM every `period_s` wakes `input()`, so that a Ctrl-C at the
    prompt raises KeyboardInterrupt there within `period_s`, always.

    On a terminal, CPython's input() is readline's: it draws the prompt, then waits in select() for a
    key, and runs Python's signal handlers only when a signal interrupts that select(). A SIGINT that
    lands after the prompt is drawn but before select() starts (a Ctrl-C pressed the moment the prompt
    appears, or typed ahead) merely marks the handler pending, and select() then waits for a key: the
    Ctrl-C was lost until the next key press. The alarm interrupts select(), Python runs the pending
    SIGINT handler, and input() raises. Only the main thread owns signal handlers and Windows has no
    setitimer: there, or while another timer is armed, the block changes nothing.
    """
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getitimer(signal.ITIMER_REAL)[0]):
        yield
        return
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    signal.setitimer(signal.ITIMER_REAL, period_s, period_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)  # an alarm due now is delivered before this returns...
        signal.signal(signal.SIGALRM, previous)  # ...and handled here, by the do-nothing handler, first


def answer_ctrl_c() -> None:
    """Make Ctrl-C raise KeyboardInterrupt here, whatever this process inherited from whoever started it:
    a program started in the background by a shell without job control (`dialogtrain chat ... &` in a
    script) has SIGINT ignored, and Python then installs no handler; blocked signals are inherited too.
    Either way a Ctrl-C at the prompt would never arrive. Main thread only."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGALRM})


def chat_session(bots: list[Bot], sampling: Sampling, out: TextIO | None = None,
                 feedback: Feedback | None = None) -> int:
    """The interactive loop on a terminal: "you> " prompt, streamed "bot> " (or "[name] ") replies, commands."""
    out = out or sys.stdout
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:
        pass
    if threading.current_thread() is threading.main_thread():
        answer_ctrl_c()
    names = ", ".join(bot.name for bot in bots)
    out.write(f"chatting with {names}; /help for commands, exit or Ctrl-D to leave\n")
    while True:
        try:
            with ctrl_c_reaches_input():
                line = input("you> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n(Ctrl-D or exit to leave)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_WORDS:
            return 0
        if text.startswith("/"):
            run_command(text, bots, out, feedback)
            continue
        for bot in bots:
            try:
                bot.answer(text, sampling, stream_to=out, label="bot> " if len(bots) == 1 else f"[{bot.name}] ")
            except KeyboardInterrupt:  # Ctrl-C just before or after the streaming: the reply is not recorded
                out.write(" [stopped]")
            out.write("\n")
            out.flush()


def run_command(text: str, bots: list[Bot], out: TextIO, feedback: Feedback | None = None) -> None:
    """One /command of the interactive session; /good, /bad and /prefer go to `feedback` (chat.feedback)."""
    command, _, argument = text.partition(" ")
    argument = argument.strip()
    if command == "/reset":
        for bot in bots:
            bot.reset()
        out.write("(conversation cleared)\n")
    elif command == "/system":
        for bot in bots:
            bot.set_system(argument)
        out.write(f"(system message {'set' if argument else 'removed'}; conversation cleared)\n")
    elif command == "/history":
        for bot in bots:
            if len(bots) > 1:
                out.write(f"== {bot.name} ==\n")
            if not bot.history:
                out.write("(empty)\n")
            for message in bot.history:
                out.write(printable(f"{message['role']}: {message['content']}") + "\n")
    elif command == "/prompt":
        for bot in bots:
            if len(bots) > 1:
                out.write(f"== {bot.name} ==\n")
            shown = bot.tokenizer.decode(bot.last_prompt_ids) if bot.last_prompt_ids else "(no prompt yet)\n"
            out.write(printable(shown) + ("" if shown.endswith("\n") else "\n"))
    elif command == "/save" and not argument:
        out.write("(usage: /save FILE)\n")
    elif command == "/save":
        conversation = bots[0].history if len(bots) == 1 else {bot.name: bot.history for bot in bots}
        try:
            Path(argument).expanduser().write_text(json.dumps(conversation, indent=2, ensure_ascii=False) + "\n")
        except OSError as err:
            out.write(f"(could not save: {err})\n")
        else:
            out.write(f"(saved to {argument})\n")
    elif command in FEEDBACK_COMMANDS and feedback is not None:
        out.write(feedback.rate(command, argument, bots) + "\n")
    elif command == "/help":
        out.write(HELP.format(feedback=FEEDBACK_HELP) + "\n")
    else:
        out.write(f"(unknown command {text!r}; /help lists them)\n")
    out.flush()


def piped_session(bots: list[Bot], sampling: Sampling, lines: TextIO | None = None, out: TextIO | None = None,
                  feedback: Feedback | None = None) -> int:
    """Scripting: each input line is one user message, each reply one stdout line ("NAME: reply" lines
    when comparing). A blank line gets a blank line, so output line i answers input line i. A /good, /bad
    or /prefer line rates the last replies as in the terminal (its notice on stderr) and gets a blank line."""
    lines, out = lines or sys.stdin, out or sys.stdout
    while line := lines.readline():
        text = line.strip()
        if text.lower() in EXIT_WORDS:
            break
        command, _, argument = text.partition(" ")
        if command in FEEDBACK_COMMANDS and feedback is not None:
            notify(feedback.rate(command, argument.strip(), bots))
            text = ""
        for bot in bots:
            reply = one_line(bot.answer(text, sampling)) if text else ""
            out.write(f"{bot.name}: {reply}\n" if len(bots) > 1 else f"{reply}\n")
        out.flush()
    return 0


def load_bots(checkpoint: str, compare: str | None, sampling: Sampling, *, system: str | None, device: str,
              dtype: str, trust_remote_code: bool, adapter: str | None = None) -> list[Bot]:
    """A Bot per checkpoint, named after its run folder (full paths when the names collide); `adapter`
    (a PEFT adapter folder) goes on the first checkpoint."""
    checkpoints = [checkpoint] if compare is None else [checkpoint, compare]
    names = [checkpoint_name(c) for c in checkpoints]
    if len(set(names)) < len(names):
        names = [str(c) for c in checkpoints]
    bots = []
    for i, (name, path) in enumerate(zip(names, checkpoints, strict=True)):
        model, tokenizer = load_chat_model(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                           adapter=adapter if i == 0 else None)
        context_budget(model, tokenizer, sampling.max_new_tokens)  # refuse a reply longer than the context now
        bots.append(Bot(name, model, tokenizer, system=system))
    return bots


def run_chat(checkpoint: str, *, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
             top_k: int = 50, repetition_penalty: float = 1.0, greedy: bool = False, seed: int | None = None,
             system: str | None = None, device: str = "auto", dtype: str = "auto", prompt: str | None = None,
             compare: str | None = None, trust_remote_code: bool = False, adapter: str | None = None,
             feedback: str | None = None) -> int:
    """Chat with CHECKPOINT (and COMPARE beside it): interactive on a terminal, line by line when piped,
    one answer with `prompt`; ratings go to `feedback` (chat.feedback). Returns the exit code; problems a
    user can fix raise UserError."""
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        repetition_penalty=repetition_penalty, greedy=greedy)
    ratings = Feedback.open(feedback, checkpoint)  # an unwritable --feedback is refused before the models load
    try:
        bots = load_bots(checkpoint, compare, sampling, system=system, device=device, dtype=dtype,
                         trust_remote_code=trust_remote_code, adapter=adapter)
        if seed is not None:
            import torch

            torch.manual_seed(seed)
        if prompt is not None:
            for bot in bots:
                reply = one_line(bot.answer(prompt, sampling))
                print(f"{bot.name}: {reply}" if len(bots) > 1 else reply, flush=True)
            return 0
        if sys.stdin.isatty():
            return chat_session(bots, sampling, feedback=ratings)
        return piped_session(bots, sampling, feedback=ratings)
    except KeyboardInterrupt:  # Ctrl-C while loading, or in a script: leave quietly, as a shell expects
        print(file=sys.stderr)
        return 130

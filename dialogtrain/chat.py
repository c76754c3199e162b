"""Chat in the terminal with an exported checkpoint (or two side by side).

    dialogtrain chat RUN                     # RUN/final/, or any Hugging Face folder, or a .gguf file
    echo "hello" | dialogtrain chat RUN      # scripting: one reply line per input line, nothing else on stdout
    dialogtrain chat RUN --prompt "hello"    # one answer, then exit
    dialogtrain chat runs/sft --compare runs/dpo

Each turn the whole history is rendered with the checkpoint's chat template (the DialoGPT template,
every turn followed by EOS, when it has none) and the model generates until EOS or --max-new-tokens.
When the history outgrows the context (the model's positions minus --max-new-tokens), the oldest whole
exchanges are dropped (the system message stays) and the user is told once. Interactive replies
stream token by token; Ctrl-C stops the reply in progress (a SIGINT handler sets a flag that a
StoppingCriteria checks after every token), not the chat. Only safetensors weights are loaded, and
code shipped with a model runs only with --trust-remote-code.

Read top to bottom: loading, the prompt (budget, trimming), generation (plain, streamed), the two
front ends (interactive session, piped lines), and `run_chat`, which the CLI calls.
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

from dialogtrain.errors import UserError
from dialogtrain.hardware import cpu_has_native_bf16

EXIT_WORDS = ("exit", "quit")
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}
HELP = """commands:
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message and start over (/system alone removes it)
  /history        print the conversation
  /prompt         print the last prompt exactly as the model saw it (rendered with the chat template)
  /save FILE      write the conversation to FILE as JSON messages
  /help           this list
  exit, quit, Ctrl-D   leave;  Ctrl-C stops a reply in progress"""


# ----------------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class Sampling:
    """How replies are generated; checked at construction, every problem reported together."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if not self.greedy and self.temperature <= 0:
            problems.append(f"--temperature {self.temperature}: must be > 0 (use --greedy for deterministic replies)")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"--top-k {self.top_k}: must be >= 0 (0 turns it off)")
        if self.repetition_penalty <= 0:
            problems.append(f"--repetition-penalty {self.repetition_penalty}: must be > 0 (1.0 turns it off)")
        if problems:
            raise UserError("; ".join(problems))

    def generate_kwargs(self) -> dict:
        """The `model.generate` arguments; sampling knobs only when sampling (greedy ignores them)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": not self.greedy}
        if not self.greedy:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


# ----------------------------------------------------------------------------------------------------
# loading


def notify(message: str) -> None:
    """Notices go to stderr, so piped stdout holds replies only."""
    print(message, file=sys.stderr, flush=True)


def resolve_device(device: str) -> str:
    """auto -> cuda when available, else cpu; an explicit device must parse and exist."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(dtype: str, device: str):
    """auto -> bf16 where the device computes it natively (a CUDA GPU that supports it, a CPU with AMX or
    AVX512-BF16), fp32 otherwise; an explicit name is taken as given (bf16 on another CPU with a note:
    emulated, it is far slower than fp32)."""
    import torch

    if dtype not in DTYPE_NAMES and dtype != "auto":
        raise UserError(f"--dtype {dtype}: choose auto, {', '.join(DTYPE_NAMES)}")
    if device.startswith("cuda"):
        native_bf16 = torch.cuda.is_bf16_supported()
    else:
        native_bf16 = device == "cpu" and cpu_has_native_bf16()
    if dtype == "auto":
        return torch.bfloat16 if native_bf16 else torch.float32
    if DTYPE_NAMES[dtype] == "bfloat16" and device == "cpu" and not native_bf16:
        notify("note: --dtype bf16: this CPU has no AMX or AVX512-BF16, so bf16 is emulated and far slower than "
               "fp32 here; --dtype auto picks fp32")
    return getattr(torch, DTYPE_NAMES[dtype])


def resolve_checkpoint(checkpoint: str) -> Path:
    """The Hugging Face folder to load: CHECKPOINT itself, or CHECKPOINT/final/ for a run folder.

    A .gguf file is converted (once, cached) into such a folder first.
    """
    from dialogtrain.gguf_import import resolve_model

    path = Path(resolve_model(str(checkpoint))).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint {checkpoint}: no such folder")
    if not path.is_dir():
        raise UserError(f"checkpoint {checkpoint}: not a folder (give an exported model folder or a run folder)")
    if (path / "final" / "config.json").is_file():
        path = path / "final"
    if not (path / "config.json").is_file():
        hint = ""
        if (path / "checkpoints").is_dir() or (path / "run.json").is_file():
            hint = (" — this run has no final/ yet; export a checkpoint with "
                    f"`dialogtrain export {path}/checkpoints/TAG --output DIR` and chat with DIR")
        raise UserError(f"checkpoint {checkpoint}: no config.json, not a Hugging Face model folder{hint}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
        pickled = sorted(p.name for p in [*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
        if pickled:
            raise UserError(f"checkpoint {checkpoint}: {path} holds only pickled weights ({', '.join(pickled[:3])}); "
                            "chat loads safetensors only, since unpickling a file can run code. Re-export it with "
                            "`dialogtrain export`, or save it again with save_pretrained(DIR, safe_serialization=True)")
        raise UserError(f"checkpoint {checkpoint}: no *.safetensors weights in {path} "
                        "(chat loads safetensors only; re-export with `dialogtrain export`)")
    return path


def load_chat_model(checkpoint: str, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) ready to generate: eval mode, on `device`, tokenizer with a chat template and a pad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dialogtrain.formatting import DIALOGPT_CHAT_TEMPLATE, prepare_tokenizer

    path = resolve_checkpoint(checkpoint)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = " (it needs --trust-remote-code)" if "trust_remote_code" in str(err) else ""
        raise UserError(f"could not load checkpoint {checkpoint}{hint}: {message}") from None
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DIALOGPT_CHAT_TEMPLATE
    tokenizer = prepare_tokenizer(tokenizer)
    return model.to(device).eval(), tokenizer


def checkpoint_name(checkpoint: str) -> str:
    """The label of a checkpoint in --compare: the run's folder name (`runs/sft/final` -> `sft`)."""
    path = Path(checkpoint).expanduser()
    if path.name == "final" and path.parent.name:
        path = path.parent
    return path.stem if path.suffix == ".gguf" else path.name or str(checkpoint)


# ----------------------------------------------------------------------------------------------------
# the prompt


def context_budget(model, tokenizer, max_new_tokens: int) -> int:
    """How many prompt tokens fit: the model's context minus the room kept for the reply."""
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    context = context or tokenizer.model_max_length
    budget = context - max_new_tokens
    if budget < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: leaves no room for the prompt in the model's "
                        f"context of {context} tokens")
    return budget


def trim_history(tokenizer, messages: list[dict], budget: int) -> list[dict]:
    """Drop the oldest whole exchanges until the rendered prompt fits in `budget` tokens.

    The system message and the last user message always stay, so a single message longer than the
    budget is left for `prompt_ids` to cut. Example with a budget that fits one exchange:
        [system, user1, bot1, user2, bot2, user3] -> [system, user2, bot2, user3]
    """
    from dialogtrain.formatting import render_prompt

    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while len(turns) > 1 and len(render_prompt(tokenizer, system + turns)) > budget:
        next_user = next(i for i in range(1, len(turns)) if turns[i]["role"] == "user")
        turns = turns[next_user:]
    return system + turns


def prompt_ids(tokenizer, messages: list[dict], budget: int) -> list[int]:
    """The rendered prompt; when even the trimmed history is too long, its last `budget` tokens."""
    from dialogtrain.formatting import render_prompt

    return render_prompt(tokenizer, messages)[-budget:]


# ----------------------------------------------------------------------------------------------------
# generation


class StopFlag:
    """A StoppingCriteria that ends generation once `event` is set (Ctrl-C from the main thread)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@contextmanager
def ctrl_c_sets(event: threading.Event) -> Iterator[None]:
    """Inside the block, Ctrl-C (SIGINT) sets `event` instead of raising KeyboardInterrupt, so the
    generating thread stops at its next token and the chat goes on. Only the main thread can own a
    signal handler; elsewhere the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS of the tokenizer, then any extra end-of-turn ids of the generation config (deduplicated)."""
    ids = [tokenizer.eos_token_id]
    extra = model.generation_config.eos_token_id
    ids += extra if isinstance(extra, list) else [extra]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generate_ids(model, tokenizer, ids: list[int], sampling: Sampling, *, streamer=None,
                 stop: threading.Event | None = None) -> list[int]:
    """The new token ids `model.generate` appends to `ids` (the final EOS included when produced)."""
    import torch
    from transformers import StoppingCriteriaList

    input_ids = torch.tensor([ids], device=model.device)  # (1, T)
    eos = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    criteria = StoppingCriteriaList([StopFlag(stop)]) if stop is not None else None
    with torch.inference_mode():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), eos_token_id=eos,
                                pad_token_id=pad, use_cache=True, streamer=streamer, stopping_criteria=criteria,
                                **sampling.generate_kwargs())  # (1, T + new)
    return output[0, len(ids):].tolist()


def decode_reply(tokenizer, new_ids: list[int]) -> str:
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def generate_reply(model, tokenizer, messages: list[dict], **sampling) -> str:
    """The reply to `messages` (ending with a user turn), trimmed to the context; `sampling` are the
    `Sampling` fields (max_new_tokens, temperature, top_p, top_k, repetition_penalty, greedy)."""
    options = Sampling(**sampling)
    budget = context_budget(model, tokenizer, options.max_new_tokens)
    ids = prompt_ids(tokenizer, trim_history(tokenizer, messages, budget), budget)
    return decode_reply(tokenizer, generate_ids(model, tokenizer, ids, options))


def token_streamer(tokenizer):
    """A TextIteratorStreamer that yields text after every token, not every word.

    transformers' TextStreamer holds text back until a space, so what is shown lags a word behind.
    This one only holds back what the next token may still change: an incomplete UTF-8 character
    (decoded as U+FFFD until its last byte arrives) and trailing whitespace (a tokenizer that cleans
    up spaces turns "hello" + " " + "." into "hello."). What it yields, joined, is the decoded reply.
    """
    from transformers import TextIteratorStreamer

    class TokenStreamer(TextIteratorStreamer):
        def put(self, value) -> None:
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.reshape(-1).tolist())  # (1, n) or (n,)
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\n"):  # a finished line: flush it and start decoding afresh (as TextStreamer does)
                shown, self.token_cache, self.print_len = text[self.print_len:], [], 0
            elif text.endswith("\ufffd"):
                return
            else:
                shown = text[self.print_len:len(text.rstrip())]
                self.print_len += len(shown)
            if shown:
                self.on_finalized_text(shown)

    return TokenStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# C0 and C1 control characters, DEL included, shown as \xNN on a terminal (newline and tab kept):
# the reply is untrusted text, and an escape sequence in it would drive the terminal.
TERMINAL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c not in (0x09, 0x0A)}


def printable(text: str) -> str:
    """`text` as it may be written to a terminal: control characters escaped as \\xNN."""
    return text.translate(TERMINAL_ESCAPES)


def stream_reply(model, tokenizer, ids: list[int], sampling: Sampling, out: TextIO) -> tuple[str, bool]:
    """Generate in a thread and write the text to `out` token by token (`printable`); Ctrl-C stops it.

    Returns (reply, interrupted). The reply is decoded from the generated ids, so it is exactly what
    `generate_ids` gives, whatever the streamer showed. While streaming, SIGINT only sets the stop
    flag (`ctrl_c_sets`); a KeyboardInterrupt raised anyway (off the main thread) sets it too.
    """
    streamer = token_streamer(tokenizer)
    stop = threading.Event()
    result: dict[str, Any] = {}

    def generate() -> None:
        try:
            result["ids"] = generate_ids(model, tokenizer, ids, sampling, streamer=streamer, stop=stop)
        except BaseException as err:  # re-raised in the main thread, after the streamer is released
            result["error"] = err
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    try:
        with ctrl_c_sets(stop):
            worker.start()
            for text in streamer:
                out.write(printable(text))
                out.flush()
    except KeyboardInterrupt:
        stop.set()
    finally:
        interrupted = stop.is_set()
        stop.set()  # a no-op when the reply ended by itself
        worker.join()
    if "error" in result:
        raise result["error"]
    return decode_reply(tokenizer, result["ids"]), interrupted


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
        kept = trim_history(self.tokenizer, history, budget)
        if len(kept) < len(history) and not self.told_about_trimming:
            notify(f"[{self.name}] the conversation outgrew the context ({budget} prompt tokens): "
                   "dropping the oldest exchanges from now on (/reset starts over)")
            self.told_about_trimming = True
        ids = prompt_ids(self.tokenizer, kept, budget + 1)
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


def chat_session(bots: list[Bot], sampling: Sampling, out: TextIO | None = None) -> int:
    """The interactive loop on a terminal: "you> " prompt, streamed "bot> " (or "[name] ") replies, commands."""
    out = out or sys.stdout
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:
        pass
    names = ", ".join(bot.name for bot in bots)
    out.write(f"chatting with {names}; /help for commands, exit or Ctrl-D to leave\n")
    while True:
        try:
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
            run_command(text, bots, out)
            continue
        for bot in bots:
            try:
                bot.answer(text, sampling, stream_to=out, label="bot> " if len(bots) == 1 else f"[{bot.name}] ")
            except KeyboardInterrupt:  # Ctrl-C before the reply started streaming: nothing was recorded
                out.write(" [stopped]")
            out.write("\n")
            out.flush()


def run_command(text: str, bots: list[Bot], out: TextIO) -> None:
    """One /command of the interactive session."""
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
    elif command == "/help":
        out.write(HELP + "\n")
    else:
        out.write(f"(unknown command {text!r}; /help lists them)\n")
    out.flush()


def piped_session(bots: list[Bot], sampling: Sampling, lines: TextIO | None = None, out: TextIO | None = None) -> int:
    """Scripting: each input line is one user message, each reply one stdout line ("NAME: reply" lines
    when comparing). A blank line gets a blank line, so output line i answers input line i."""
    lines, out = lines or sys.stdin, out or sys.stdout
    while line := lines.readline():
        text = line.strip()
        if text.lower() in EXIT_WORDS:
            break
        for bot in bots:
            reply = one_line(bot.answer(text, sampling)) if text else ""
            out.write(f"{bot.name}: {reply}\n" if len(bots) > 1 else f"{reply}\n")
        out.flush()
    return 0


def load_bots(checkpoint: str, compare: str | None, sampling: Sampling, *, system: str | None, device: str,
              dtype: str, trust_remote_code: bool) -> list[Bot]:
    """A Bot per checkpoint, named after its run folder (full paths when the names collide)."""
    checkpoints = [checkpoint] if compare is None else [checkpoint, compare]
    names = [checkpoint_name(c) for c in checkpoints]
    if len(set(names)) < len(names):
        names = [str(c) for c in checkpoints]
    bots = []
    for name, path in zip(names, checkpoints, strict=True):
        model, tokenizer = load_chat_model(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        context_budget(model, tokenizer, sampling.max_new_tokens)  # refuse a reply longer than the context now
        bots.append(Bot(name, model, tokenizer, system=system))
    return bots


def run_chat(checkpoint: str, *, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
             top_k: int = 50, repetition_penalty: float = 1.0, greedy: bool = False, seed: int | None = None,
             system: str | None = None, device: str = "auto", dtype: str = "auto", prompt: str | None = None,
             compare: str | None = None, trust_remote_code: bool = False) -> int:
    """Chat with CHECKPOINT (and COMPARE beside it): interactive on a terminal, line by line when piped,
    one answer with `prompt`. Returns the exit code; problems a user can fix raise UserError."""
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        repetition_penalty=repetition_penalty, greedy=greedy)
    try:
        bots = load_bots(checkpoint, compare, sampling, system=system, device=device, dtype=dtype,
                         trust_remote_code=trust_remote_code)
        if seed is not None:
            import torch

            torch.manual_seed(seed)
        if prompt is not None:
            for bot in bots:
                reply = one_line(bot.answer(prompt, sampling))
                print(f"{bot.name}: {reply}" if len(bots) > 1 else reply, flush=True)
            return 0
        if sys.stdin.isatty():
            return chat_session(bots, sampling)
        return piped_session(bots, sampling)
    except KeyboardInterrupt:  # Ctrl-C while loading, or in a script: leave quietly, as a shell expects
        print(file=sys.stderr)
        return 130

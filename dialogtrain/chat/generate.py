"""Generating a reply: the checkpoint loaded for chat, the history fitted to its context, tokens streamed.

Each turn the whole history is rendered with the checkpoint's chat template (the DialoGPT template,
every turn followed by EOS, when it has none) and the model generates until EOS or max_new_tokens.
When the history outgrows the context (the model's positions minus max_new_tokens), the oldest whole
exchanges are dropped (the system message stays). Only safetensors weights are loaded, and code
shipped with a model runs only with trust_remote_code.

A reply is one `model.generate` call on the calling thread, the call a script would make, plus a
streamer and one stopping criterion when streamed: the streamer writes each token's text as soon as
it is made, and Ctrl-C stops the reply in progress (a SIGINT handler sets a flag that the criterion
reads after every token), not the chat.

Read top to bottom: options, loading, the prompt (budget, trimming), generation (plain, streamed).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from dialogtrain.errors import UserError
from dialogtrain.hardware import cpu_has_native_bf16, gpu_precision

DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}


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
    """auto -> bf16 where the device computes it natively (a GPU of compute capability 8.0 or more, a CPU
    with AMX or AVX512-BF16); fp16 on an older GPU (V100, T4: fp16 tensor cores); fp32 on another CPU.
    An explicit name is taken as given, except bf16 on a GPU without bf16 tensor cores (refused, as
    training refuses it) and with a note for bf16 on a CPU that emulates it (far slower than fp32)."""
    import torch

    if dtype not in DTYPE_NAMES and dtype != "auto":
        raise UserError(f"--dtype {dtype}: choose auto, {', '.join(DTYPE_NAMES)}")
    if device.startswith("cuda"):
        # not torch.cuda.is_bf16_supported(): it counts emulation, so it says yes on a V100
        capability = tuple(torch.cuda.get_device_capability(device))
        fastest = gpu_precision(capability)
        if dtype == "auto":
            return torch.bfloat16 if fastest == "bf16" else torch.float16
        if DTYPE_NAMES[dtype] == "bfloat16" and fastest != "bf16":
            raise UserError(f"--dtype {dtype}: this GPU (compute capability {capability[0]}.{capability[1]}) has no "
                            f"bf16 tensor cores, bf16 needs 8.0 or more (A100, H100, RTX 30xx); use --dtype fp16 "
                            f"or auto")
        return getattr(torch, DTYPE_NAMES[dtype])
    native_bf16 = device == "cpu" and cpu_has_native_bf16()
    if dtype == "auto":
        return torch.bfloat16 if native_bf16 else torch.float32
    if DTYPE_NAMES[dtype] == "bfloat16" and not native_bf16:
        notify("note: --dtype bf16: this CPU has no AMX or AVX512-BF16, so bf16 is emulated and far slower than "
               "fp32 here; --dtype auto picks fp32")
    return getattr(torch, DTYPE_NAMES[dtype])


def resolve_checkpoint(checkpoint: str) -> Path:
    """The Hugging Face folder to load: CHECKPOINT itself, or CHECKPOINT/final/ for a run folder.

    A .gguf file is converted (once, cached) into such a folder first.
    """
    from dialogtrain.export.gguf import resolve_model

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


def load_chat_model(checkpoint: str, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                    adapter: str | None = None):
    """(model, tokenizer) ready to generate: eval mode, on `device`, tokenizer with a chat template and a pad;
    with `adapter`, the PEFT adapter of that folder on top of the checkpoint, not merged (with_adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dialogtrain.data.templates import DIALOGPT_CHAT_TEMPLATE, prepare_tokenizer

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
    if adapter:
        model = with_adapter(model, adapter, checkpoint)
    return model.to(device).eval(), tokenizer


def with_adapter(model, adapter: str, checkpoint: str):
    """`model` with the PEFT (LoRA) adapter of folder `adapter` (adapter_config.json and
    adapter_model.safetensors, e.g. a LoRA run's final/adapter), kept apart from the weights, not merged."""
    from peft import PeftModel

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise UserError(f"--adapter {adapter}: not a PEFT adapter folder (it needs adapter_config.json and "
                        "adapter_model.safetensors; a LoRA run writes them in RUN/final/adapter)")
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--adapter {adapter}: cannot load it onto {checkpoint}: {message}") from None


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
    budget is left for the caller to cut (see `fit_prompt`). Example with a budget that fits one exchange:
        [system, user1, bot1, user2, bot2, user3] -> [system, user2, bot2, user3]
    """
    from dialogtrain.data.encode import render_prompt

    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while len(turns) > 1 and len(render_prompt(tokenizer, system + turns)) > budget:
        next_user = next(i for i in range(1, len(turns)) if turns[i]["role"] == "user")
        turns = turns[next_user:]
    return system + turns


def fit_prompt(tokenizer, messages: list[dict], budget: int) -> tuple[list[int], list[dict]]:
    """(ids, the messages they render): the whole conversation when its prompt fits in `budget` tokens, the
    usual case, rendered once; else `trim_history`'s. The ids are not cut: when even the last message
    alone is too long they are more than `budget`, and the caller keeps the last `budget`."""
    from dialogtrain.data.encode import render_prompt

    ids = render_prompt(tokenizer, messages)
    if len(ids) > budget:
        messages = trim_history(tokenizer, messages, budget)
        ids = render_prompt(tokenizer, messages)
    return ids, messages


# ----------------------------------------------------------------------------------------------------
# generation


class StopFlag:
    """A StoppingCriteria that ends generation once `event` is set (by Ctrl-C, see `ctrl_c_sets`).

    It returns a bool, not a tensor: StoppingCriteriaList ors it into its (batch,) tensor, so nothing is
    allocated per token.
    """

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


@contextmanager
def ctrl_c_sets(event: threading.Event) -> Iterator[None]:
    """Inside the block, Ctrl-C (SIGINT) sets `event` instead of raising KeyboardInterrupt, so generation
    stops at its next token and the chat goes on. Only the main thread can own a signal handler;
    elsewhere the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)  # runs a pending handler (ours) first: no Ctrl-C is dropped


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
    ids, _ = fit_prompt(tokenizer, messages, budget)
    return decode_reply(tokenizer, generate_ids(model, tokenizer, ids[-budget:], options))


class TokenStreamer:
    """A `model.generate` streamer (its `put`, `end` protocol) that hands `show` the text of every token.

    transformers' TextStreamer holds text back until a space, so what is shown lags a word behind.
    This one only holds back what the next token may still change: an incomplete UTF-8 character
    (decoded as U+FFFD until its last byte arrives) and trailing whitespace (a tokenizer that cleans
    up spaces turns "hello" + " " + "." into "hello."). What it shows, joined, is the decoded reply.
    Each token decodes the current line only: a finished line is shown and decoding starts afresh.
    """

    def __init__(self, tokenizer, show: Callable[[str], Any]):
        self.tokenizer = tokenizer
        self.show = show
        self.new_ids: list[int] = []  # the reply's ids so far, for a reply cut short by an exception
        self.line_ids: list[int] = []  # the ids of the current line
        self.shown = 0  # how many characters of the current line were shown
        self.prompt_seen = False

    def put(self, value) -> None:
        """`value`: the prompt first, (1, T), then each new token, (1,)."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.new_ids += ids
        self.line_ids += ids
        text = self.tokenizer.decode(self.line_ids, skip_special_tokens=True)
        if text.endswith("\n"):  # a finished line: show it and start decoding afresh (as TextStreamer does)
            piece, self.line_ids, self.shown = text[self.shown:], [], 0
        elif text.endswith("\ufffd"):
            return
        else:
            piece = text[self.shown:len(text.rstrip())]
            self.shown += len(piece)
        if piece:
            self.show(piece)

    def end(self) -> None:
        """Show what was held back."""
        piece = self.tokenizer.decode(self.line_ids, skip_special_tokens=True)[self.shown:]
        self.line_ids, self.shown = [], 0
        if piece:
            self.show(piece)


# C0 and C1 control characters, DEL included, shown as \xNN on a terminal (newline and tab kept):
# the reply is untrusted text, and an escape sequence in it would drive the terminal.
TERMINAL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c not in (0x09, 0x0A)}


def printable(text: str) -> str:
    """`text` as it may be written to a terminal: control characters escaped as \\xNN."""
    return text.translate(TERMINAL_ESCAPES)


def stream_reply(model, tokenizer, ids: list[int], sampling: Sampling, out: TextIO) -> tuple[str, bool]:
    """Generate, writing the text to `out` token by token (`printable`) as it is made; Ctrl-C stops it.

    Returns (reply, interrupted). The reply is decoded from the generated ids, so it is exactly what
    `generate_ids` gives, whatever was shown. While generating, SIGINT only sets the stop flag
    (`ctrl_c_sets`); a KeyboardInterrupt raised anyway (off the main thread, or by `out`) ends the
    reply where it was.
    """
    def show(text: str) -> None:
        out.write(printable(text))
        out.flush()

    streamer = TokenStreamer(tokenizer, show)
    stop = threading.Event()
    try:
        with ctrl_c_sets(stop):
            new_ids = generate_ids(model, tokenizer, ids, sampling, streamer=streamer, stop=stop)
    except KeyboardInterrupt:
        stop.set()
        new_ids = streamer.new_ids
    return decode_reply(tokenizer, new_ids), stop.is_set()

"""Chat speed against bare `model.generate` on SmolLM2-135M-Instruct, the demo model.

    python -m bench.chat [--max-new-tokens 64] [--repeats 5] [--device auto] [--dtype auto]

Both sides answer the same message greedily on the same loaded model, and the chat's reply is checked
to be model.generate's, token for token, so both produce the same number of tokens:

- model.generate: the rendered prompt ids in, nothing else (no streamer, no stopping criteria), called
  from the main thread as a script would.
- dialogtrain chat: `Bot.answer` as the interactive session runs it: the history rendered with the
  chat template, generation in a thread with the Ctrl-C stopping criterion, every token decoded and
  written to a terminal (here a sink that notes the time of the first text).
- model.generate in a thread, a control: the same bare call run the way the chat runs it, off the
  main thread. OpenMP and MKL keep thread pools per calling thread, and on an oversubscribed CPU the
  main thread's pool can be several times slower (or faster) than a fresh one; this column tells that
  effect apart from the chat's own cost (chat / control).

Measured, after one warm-up of each side, `repeats` times alternating the sides, medians reported:
tokens/s (new tokens / wall time of a whole reply) and first-token latency (the call to the first new
token: a one-token model.generate for the bare side, the first text on the terminal for the chat).
The ratios are chat / generate from the same run.
"""

from __future__ import annotations

import argparse
import io
import statistics
import threading
import time

MESSAGE = "Write a short story about a robot who learns to paint."
MODEL_NAME = "SmolLM2-135M-Instruct"


class TimedTerminal(io.StringIO):
    """A terminal that remembers when the first text arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.first_text_at: float | None = None

    def write(self, text: str) -> int:
        if text and self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        return super().write(text)


def time_generate(model, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[float, list[int]]:
    """(seconds, new ids) of one bare greedy model.generate."""
    import torch

    input_ids = torch.tensor([ids], device=model.device)  # (1, T)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)  # (1, T + new)
    seconds = time.perf_counter() - start
    return seconds, output[0, len(ids):].tolist()


def in_thread(function, *args):
    """`function(*args)` run in a new thread (as the chat runs generation); its result."""
    result = []
    worker = threading.Thread(target=lambda: result.append(function(*args)))
    worker.start()
    worker.join()
    return result[0]


def time_chat(bot, sampling) -> tuple[float, float, str]:
    """(seconds to the whole reply, seconds to its first text, reply) of one streamed chat answer."""
    bot.reset()
    terminal = TimedTerminal()
    start = time.perf_counter()
    reply = bot.answer(MESSAGE, sampling, stream_to=terminal)
    seconds = time.perf_counter() - start
    return seconds, terminal.first_text_at - start, reply


def markdown_table(figures: dict) -> str:
    f = figures
    title = (f"chat vs model.generate: {f['model']}, {f['device']} {f['dtype']}, {f['torch_threads']} threads, "
             f"{f['new_tokens']} new tokens, median of {f['repeats']}")
    rows = [
        ("tokens/s", f"{f['generate_tokens_per_s']:.1f}", f"{f['chat_tokens_per_s']:.1f}",
         f"**{f['tokens_per_s_ratio']:.2f}**", f"{f['thread_generate_tokens_per_s']:.1f}",
         f"{f['chat_tokens_per_s'] / f['thread_generate_tokens_per_s']:.2f}"),
        ("first-token latency (ms)", f"{f['generate_first_token_ms']:.1f}", f"{f['chat_first_token_ms']:.1f}",
         f"**{f['first_token_ratio']:.2f}**", f"{f['thread_generate_first_token_ms']:.1f}",
         f"{f['chat_first_token_ms'] / f['thread_generate_first_token_ms']:.2f}"),
    ]
    lines = [f"### {title}", "",
             "| | model.generate | dialogtrain chat | chat / generate | control: generate in a thread "
             "| chat / control |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def main(max_new_tokens: int = 64, repeats: int = 5, device: str = "auto", dtype: str = "auto") -> dict:
    """Run the benchmark, print its markdown table, return the figures (medians, ratios, settings)."""
    import torch

    from dialogtrain.chat import Bot, Sampling, decode_reply, load_chat_model
    from dialogtrain.formatting import render_prompt
    from dialogtrain.gguf_import import resolve_model, smollm2_gguf_path

    model, tokenizer = load_chat_model(resolve_model(str(smollm2_gguf_path())), device=device, dtype=dtype)
    sampling = Sampling(max_new_tokens=max_new_tokens, greedy=True)
    bot = Bot(MODEL_NAME, model, tokenizer)
    ids = render_prompt(tokenizer, [{"role": "user", "content": MESSAGE}])

    # warm-up, and the check that both sides produce the same tokens
    _, new_ids = time_generate(model, tokenizer, ids, max_new_tokens)
    time_generate(model, tokenizer, ids, 1)
    _, _, reply = time_chat(bot, sampling)
    if reply != decode_reply(tokenizer, new_ids):
        raise AssertionError(f"the chat's reply differs from model.generate's:\n{reply!r}\n{decode_reply(tokenizer, new_ids)!r}")

    in_thread(time_generate, model, tokenizer, ids, max_new_tokens)

    generate_s, generate_first_s, chat_s, chat_first_s, thread_s, thread_first_s = [], [], [], [], [], []
    for _ in range(repeats):  # the sides alternate, so a change in the machine's load hits them alike
        generate_s.append(time_generate(model, tokenizer, ids, max_new_tokens)[0])
        generate_first_s.append(time_generate(model, tokenizer, ids, 1)[0])
        seconds, first_s, _ = time_chat(bot, sampling)
        chat_s.append(seconds)
        chat_first_s.append(first_s)
        thread_s.append(in_thread(time_generate, model, tokenizer, ids, max_new_tokens)[0])
        thread_first_s.append(in_thread(time_generate, model, tokenizer, ids, 1)[0])

    n = len(new_ids)
    figures = {
        "model": MODEL_NAME, "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(), "new_tokens": n, "repeats": repeats,
        "generate_tokens_per_s": n / statistics.median(generate_s),
        "chat_tokens_per_s": n / statistics.median(chat_s),
        "generate_first_token_ms": 1000 * statistics.median(generate_first_s),
        "chat_first_token_ms": 1000 * statistics.median(chat_first_s),
        "thread_generate_tokens_per_s": n / statistics.median(thread_s),
        "thread_generate_first_token_ms": 1000 * statistics.median(thread_first_s),
    }
    figures["tokens_per_s_ratio"] = figures["chat_tokens_per_s"] / figures["generate_tokens_per_s"]
    figures["first_token_ratio"] = figures["chat_first_token_ms"] / figures["generate_first_token_ms"]
    print(markdown_table(figures), flush=True)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    main(**vars(parser.parse_args()))

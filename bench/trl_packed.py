"""The bench's "trl_packed" group: SFT tokens/s against TRL at its best layout, packed rows, at the same
tokens per step on both sides.

    python -m bench.run --only trl_packed [--quick]

TRL's SFTTrainer with `packing=True, packing_strategy="bfd"` (best-fit decreasing into rows of max_length
tokens, padding-free; bench/trl_sft.py with "packing"), micro-batch rows a step, as TRL's docs advise.
A TRL step then holds about micro-batch x max_length tokens, several times the SFT rows' step of
micro-batch conversations, so ours runs with more conversations a step: as many as TRL's rows hold on
average, counted from the data, `conversations_per_step`: TRL's own `pack_dataset` packs our encoding of
the training conversations into rows of max_length (the same rendering: bench.workload), and a step of
R rows holds R x conversations / rows of them. Both sides' measured tokens per step are in the row.
Otherwise the SFT rows' workload, lr, steps, seed, precision and timing (warm-up steps untimed).
"""

from __future__ import annotations

import dataclasses
import statistics

from bench.runner import ours_sft, progress, train_records, trl, trl_config


def conversation_lengths(model: str, conversations_file: str, max_length: int) -> list[int]:
    """Tokens of each training conversation as dialogtrain encodes it (the chat template; too long: the
    oldest turns dropped, so none exceeds max_length)."""
    from dialogtrain.data.encode import encode_conversations
    from dialogtrain.data.load import load_conversations
    from dialogtrain.train.model import load_tokenizer

    examples, _ = encode_conversations(load_tokenizer(model), load_conversations(conversations_file)[0], max_length)
    return [len(e["input_ids"]) for e in examples]


def packed_rows(lengths: list[int], max_length: int) -> int:
    """How many rows TRL's best-fit-decreasing packing (trl.pack_dataset, "bfd") makes of sequences of
    these lengths, rows of at most max_length tokens."""
    from datasets import Dataset
    from trl import pack_dataset

    sequences = Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    return len(pack_dataset(sequences, max_length, "bfd"))


def conversations_per_step(conversations: int, rows: int, rows_per_step: int) -> int:
    """Conversations in `rows_per_step` packed rows on average, when `conversations` pack into `rows`:
    834 conversations in 190 rows, 8 rows a step -> round(8 x 834 / 190) = round(35.1) = 35."""
    return max(1, round(rows_per_step * conversations / rows))


def measure(ctx, r: dict) -> None:
    plan = ctx.plan
    lengths = conversation_lengths(ctx.model, ctx.data["sft_train"], plan.max_length)
    packed = packed_rows(lengths, plan.max_length)
    per_step = conversations_per_step(len(lengths), packed, plan.micro_batch)
    progress(f"SFT, TRL packed (bfd): {plan.sft_steps} steps of {plan.micro_batch} rows of {plan.max_length}")
    peer = trl("trl_sft", trl_config(ctx.model, plan, ctx.precision, ctx.gpus, train=ctx.data["sft_train"],
                                     eval=ctx.data["sft_eval"], steps=plan.sft_steps, lr=plan.sft_lr, packing=True),
               ctx.out, "trl-sft-packed")
    progress(f"SFT, dialogtrain: {plan.sft_steps} steps of {per_step} conversations")
    name = "ours-sft-trl-packed-tokens"
    ours = ours_sft(ctx.model, ctx.data, dataclasses.replace(plan, micro_batch=per_step), ctx.precision, ctx.out,
                    name=name, gpus=ctx.gpus)
    ours["step_tokens"] = [record["input_tokens"] for record in train_records(ctx.out / name)]
    r["trl_packed"] = {"conversations": len(lengths), "packed_rows": packed, "rows_per_step": plan.micro_batch,
                       "max_length": plan.max_length, "conversations_per_step": per_step,
                       "expected_tokens_per_step": plan.micro_batch * sum(lengths) / packed, "ours": ours, "trl": peer}


def rows(r: dict, plan) -> list[dict]:
    from bench.table import row  # bench.table's ROWS imports this module

    p = r["trl_packed"]
    ours, peer = p["ours"], p["trl"]
    ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
    tokens = [statistics.mean(side["step_tokens"][plan.warmup:]) for side in (ours, peer)]
    return [row(f"SFT tokens/s vs TRL packed (`packing_strategy=\"bfd\"`, {p['rows_per_step']} rows of "
                f"{p['max_length']}), same tokens per step: ours {p['conversations_per_step']} conversations "
                f"a step, tokens per timed step {tokens[0]:.0f} vs TRL {tokens[1]:.0f}",
                f"{ours['tokens_per_s']:.0f}", f"{peer['tokens_per_s']:.0f}", f"{ratio:.2f}x", ">= 2x", ratio >= 2)]

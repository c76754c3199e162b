"""How much of the workload one bench run does: the full table, or --quick."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """How much of the workload one bench run does."""

    sft_steps: int
    dpo_steps: int
    warmup: int  # untimed steps at the start of every training run
    sft_held_out: int
    dpo_held_out: int
    memory_steps: int
    startup_repeats: int
    peak_repeats: int
    micro_batch: int = 8
    max_length: int = 256
    sft_lr: float = 1e-4
    dpo_lr: float = 5e-6
    beta: float = 0.1
    seed: int = 42


FULL = Plan(sft_steps=20, dpo_steps=8, warmup=3, sft_held_out=64, dpo_held_out=32, memory_steps=2,
            startup_repeats=5, peak_repeats=3)
QUICK = Plan(sft_steps=3, dpo_steps=3, warmup=1, sft_held_out=8, dpo_held_out=8, memory_steps=1,
             startup_repeats=2, peak_repeats=1)

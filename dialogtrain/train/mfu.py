"""Model FLOPs utilisation: training FLOPs per token, the matmul peak of this machine, and their ratio.

mfu = train_flops_per_token x tokens_per_s / peak FLOP/s, the peak being a matmul of the run's
precision measured once at start-up on every rank at the same time (`matmul_peak_flops`), or
DIALOGTRAIN_PEAK_FLOPS (FLOP/s per process) where you know it better.
"""

from __future__ import annotations

import math
import os
import time

PEAK_FLOPS_ENV = "DIALOGTRAIN_PEAK_FLOPS"


def train_flops_per_token(model) -> int:
    """Training FLOPs per token, attention not counted: 6 per trained parameter (forward 2, the backward's
    gradients of the activations 2 and of the weight 2), 4 per frozen one (LoRA's base: no weight gradient).

    Counts each parameter once (tied embeddings once); under ZeRO-3 the full size (`ds_numel`).
    """
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += getattr(p, "ds_numel", p.numel()) * (6 if p.requires_grad else 4)
    return total


def matmul_peak_flops(precision: str, device, budget_s: float = 0.8) -> float:
    """FLOP/s of square `precision` matmuls on `device` with this process's threads: the best of
    sizes 256, 512, ... each timed for at least 20 ms, a size tried only while its predicted cost
    (at the best rate so far) fits in `budget_s` (bf16 on a CPU without native bf16 is 10-100x
    slower than fp32, so it stops at small sizes instead of taking seconds).
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "pure-bf16": torch.bfloat16}[precision]
    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # A generator of its own: the number of sizes tried depends on timing, and drawing from the global
    # RNG would make a run's dropout (and its resume) depend on how busy the machine was.
    generator = torch.Generator(device=device).manual_seed(0)
    started, best, size = time.perf_counter(), 0.0, 256
    while size <= 16384:
        a = torch.randn(size, size, device=device, generator=generator).to(dtype)
        b = torch.randn(size, size, device=device, generator=generator).to(dtype)
        a @ b  # warm-up: thread pool, kernel selection, page faults
        sync()
        t0, n = time.perf_counter(), 0
        while n < 2 or time.perf_counter() - t0 < 0.02:
            a @ b
            sync()
            n += 1
        best = max(best, 2 * size ** 3 * n / (time.perf_counter() - t0))
        next_cost = 3 * 2 * (2 * size) ** 3 / best  # a warm-up and two timed matmuls of twice the size
        if time.perf_counter() - started + next_cost > budget_s:
            break
        size *= 2
    return best


def peak_flops(precision: str, world) -> float:
    """The run's peak FLOP/s: every rank measures at once (so they share the machine as in training)
    and the ranks' figures are summed; DIALOGTRAIN_PEAK_FLOPS (per process) skips the measurement."""
    given = os.environ.get(PEAK_FLOPS_ENV)
    mine = float(given) if given else matmul_peak_flops(precision, world.device)
    return world.sum(mine)[0]


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak, 0..1 (nan without a peak)."""
    return flops_per_token * tokens_per_s / peak if peak > 0 else math.nan

"""`RUN/metrics.jsonl` and the progress bar: written by rank 0, a null object on the other ranks.

Metric names are a small fixed vocabulary that tests and `dialogtrain plot` parse back:
step, epoch, loss, lr, grad_norm, tokens_per_s, input_tokens, target_tokens, mfu, eval_loss,
eval_ppl, and for DPO rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected (eval variants prefixed with `eval_`).

tokens_per_s counts the non-pad input tokens of the step (all ranks) over its wall time;
mfu = train_flops_per_token x tokens_per_s / peak FLOP/s, the peak being a matmul of the run's
precision measured once at start-up on every rank at the same time (`matmul_peak_flops`), or
DIALOGTRAIN_PEAK_FLOPS (FLOP/s per process) where you know it better.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

PEAK_FLOPS_ENV = "DIALOGTRAIN_PEAK_FLOPS"


class MetricsLog:
    """Appends one JSON object per logged step and drives a tqdm bar on stderr."""

    def __init__(self, path: Path, total_steps: int, initial_step: int = 0):
        from tqdm import tqdm

        self.file = open(path, "a")
        self.bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, file=sys.stderr,
                        desc="train", mininterval=0.5)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps({k: round_float(v) for k, v in record.items()}) + "\n")
        self.file.flush()

    def progress(self, steps: int, **shown: float) -> None:
        self.bar.update(steps)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()
        self.file.close()


class NullLog:
    """What ranks other than 0 get: the same methods, doing nothing."""

    def log(self, record: dict) -> None:
        pass

    def progress(self, steps: int, **shown: float) -> None:
        pass

    def close(self) -> None:
        pass


def open_metrics(run_dir: Path, is_main: bool, total_steps: int, initial_step: int = 0):
    return MetricsLog(run_dir / "metrics.jsonl", total_steps, initial_step) if is_main else NullLog()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def round_float(value):
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value


# ----------------------------------------------------------------------------------------------------
# model FLOPs utilisation


def train_flops_per_token(model) -> int:
    """6 x parameters: forward (2N) and backward (4N) FLOPs per trained token, attention not counted.

    Counts each parameter once (tied embeddings once); under ZeRO-3 the full size (`ds_numel`).
    """
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += getattr(p, "ds_numel", p.numel())
    return 6 * total


def matmul_peak_flops(precision: str, device, budget_s: float = 0.8) -> float:
    """FLOP/s of square `precision` matmuls on `device` with this process's threads: the best of
    sizes 256, 512, ... each timed for at least 20 ms, a size tried only while its predicted cost
    (at the best rate so far) fits in `budget_s` (bf16 on a CPU without native bf16 is 10-100x
    slower than fp32, so it stops at small sizes instead of taking seconds).
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
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

"""Step timings shared by both sides: warm-up steps dropped, throughput over the rest.

A side's throughput is (sum of the timed steps' units) / (sum of their wall times), units being non-pad
input tokens or preference pairs; the first `warmup` optimizer steps are not timed (allocator,
thread pools and kernel selection settle there).
"""

from __future__ import annotations

import resource
import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.plan import Plan


def throughput(seconds: list[float], units: list[float], warmup: int) -> dict:
    """{"per_s", "timed_steps", "step_s_median"} over the steps after `warmup`."""
    timed_s, timed_units = seconds[warmup:], units[warmup:]
    if not timed_s:
        raise ValueError(f"no step left to time after {warmup} warm-up steps of {len(seconds)}")
    return {"per_s": sum(timed_units) / sum(timed_s), "timed_steps": len(timed_s),
            "step_s_median": statistics.median(timed_s)}


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trainer_step_timer():
    """A transformers TrainerCallback noting each optimizer step's wall time (on_step_begin -> on_step_end:
    forward, backward and optimizer step; the batch was already fetched and collated, which favours TRL)
    and the cumulative `num_tokens` TRL logs (non-pad input tokens) after each step."""
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.num_tokens, self._started = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs and "train_runtime" not in logs:
                self.num_tokens.append(float(logs["num_tokens"]))

        def step_tokens(self) -> list[float]:
            return [b - a for a, b in zip([0.0] + self.num_tokens[:-1], self.num_tokens, strict=True)]

    return StepTimer()


def charged_pairs_per_s(result: dict, plan: Plan) -> float:
    """Pairs/s with the precomputation charged per pair it covers (see the module doc)."""
    timed_pairs = result["timed_steps"] * plan.micro_batch
    timed_s = timed_pairs / result["pairs_per_s"]
    per_pair = result["precompute_s"] / result["precomputed_pairs"] if result["precomputed_pairs"] else 0.0
    return timed_pairs / (timed_s + per_pair * timed_pairs)

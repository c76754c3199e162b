"""`RUN/metrics.jsonl` and the progress bar: written by rank 0, a null object on the other ranks.

Metric names are a small fixed vocabulary that tests and `dialogtrain plot` parse back:
step, epoch, loss, lr, grad_norm, tokens_per_s, input_tokens, target_tokens, mfu (train.mfu),
eval_loss, eval_ppl, and for DPO rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected, for ORPO also nll_loss, log_odds_ratio,
log_odds_chosen, for KTO kl (eval variants prefixed with `eval_`).
tokens_per_s counts the non-pad input tokens of the step (all ranks) over its wall time.
Each record written also goes to the trackers of --report-to (train.trackers), as written.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per logged step and drives a tqdm bar on stderr."""

    def __init__(self, path: Path, total_steps: int, initial_step: int = 0, trackers=None):
        from tqdm import tqdm

        self.trackers = trackers  # train.trackers.Trackers: --report-to, each record as written here
        self.file = open(path, "a")
        self.bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, file=sys.stderr,
                        desc="train", mininterval=0.5)

    def log(self, record: dict) -> None:
        record = {k: round_float(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.trackers:
            self.trackers.log(record)

    def progress(self, steps: int, **shown: float) -> None:
        self.bar.update(steps)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.trackers:
            self.trackers.close()


class NullLog:
    """What ranks other than 0 get: the same methods, doing nothing."""

    def log(self, record: dict) -> None:
        pass

    def progress(self, steps: int, **shown: float) -> None:
        pass

    def close(self) -> None:
        pass


def open_metrics(run_dir: Path, is_main: bool, total_steps: int, initial_step: int = 0, options=None):
    """Rank 0: RUN/metrics.jsonl (after `initial_step`, resuming) and the trackers of `options` (--report-to)."""
    if not is_main:
        return NullLog()
    from dialogtrain.train.trackers import open_trackers

    trackers = open_trackers(options, run_dir, initial_step) if options else None
    return MetricsLog(run_dir / "metrics.jsonl", total_steps, initial_step, trackers)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def round_float(value):
    """6 significant digits; NaN and infinities (an fp16 step that overflowed) are null: JSON has none."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics records of steps before `step` (and the training record of `step` itself), so a
    resumed run logs every later step exactly once. A line cut short by a kill is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) < step or (record.get("step") == step and "loss" in record):
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)

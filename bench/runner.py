"""Running one side of the bench as its own process: the real `dialogtrain` CLI, or a TRL script, and reading
what it recorded."""


from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.plan import Plan
from bench.timing import throughput

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PRECOMPUTE_LINE = re.compile(r"reference log-probs of (\d+) pairs computed in ([\d.]+)s")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def dialogtrain_command() -> list[str]:
    """The console script of this environment (what a user types), else the module."""
    script = Path(sys.executable).parent / "dialogtrain"
    return [str(script)] if script.exists() else [sys.executable, "-m", "launcher.cli"]


def quiet_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONPATH": str(REPO), **extra}
    env.pop("OMP_NUM_THREADS", None)  # the launcher splits the cores itself; TRL sets its own
    return env


def run_checked(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = REPO) -> str:
    """Run `argv`, output to `log`; return the output, or raise with its tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env or quiet_env(), cwd=cwd)
    log.write_text(completed.stdout)
    if completed.returncode != 0:
        tail = "\n".join(completed.stdout.splitlines()[-30:])
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {completed.returncode} (log: {log}):\n{tail}")
    return completed.stdout


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def common_flags(plan: Plan, precision: str, steps: int, lr: float, gpus: str = "cpu") -> list[str]:
    """The flags every bench run of ours shares; `gpus`: `--gpus` (bench.gpu_check runs on "0")."""
    return ["--gpus", gpus, "--nproc", "1", "--precision", precision, "--micro-batch", str(plan.micro_batch),
            "--grad-accum", "1", "--max-steps", str(steps), "--max-length", str(plan.max_length), "--lr", str(lr),
            "--warmup-steps", "0", "--seed", str(plan.seed), "--log-every", "1", "--overwrite"]


def train_records(run_dir: Path) -> list[dict]:
    from dialogtrain.train.metrics import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_s" in r]


def step_seconds(records: list[dict]) -> list[float]:
    return [r["input_tokens"] / r["tokens_per_s"] for r in records]


def ours_sft(model: str, data: dict, plan: Plan, precision: str, out: Path, flags: tuple[str, ...] = (),
             name: str = "ours-sft", lr: float | None = None, gpus: str = "cpu") -> dict:
    """`dialogtrain sft` on the workload (with more `flags`, e.g. LoRA's, and another `lr`), timed."""
    run_dir = out / name
    run_checked([*dialogtrain_command(), "sft", "--model", model, "--data", data["sft_train"],
                 "--eval-data", data["sft_eval"], "--output", str(run_dir), *flags,
                 *common_flags(plan, precision, plan.sft_steps, lr or plan.sft_lr, gpus)],
                out / "logs" / f"{name}.log")
    records = train_records(run_dir)
    speed = throughput(step_seconds(records), [r["input_tokens"] for r in records], plan.warmup)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    return {"tokens_per_s": speed["per_s"], "timed_steps": speed["timed_steps"],
            "step_s_median": speed["step_s_median"], "eval_loss": evals[-1],
            "live_mfu_median": statistics.median(r["mfu"] for r in records[plan.warmup:])}


def ours_dpo(model: str, data: dict, plan: Plan, precision: str, out: Path, precompute: bool,
             flags: tuple[str, ...] = (), name: str | None = None, lr: float | None = None,
             gpus: str = "cpu") -> dict:
    """`dialogtrain dpo` on the workload (with more `flags`, e.g. LoRA's, and another `lr`), timed."""
    name = name or ("ours-dpo-precomputed" if precompute else "ours-dpo")
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a reference cache of an earlier run would skip the precompute
    log = run_checked([*dialogtrain_command(), "dpo", "--model", model, "--data", data["dpo_train"],
                       "--eval-data", data["dpo_eval"], "--output", str(run_dir), "--beta", str(plan.beta),
                       *(["--precompute-ref"] if precompute else []), *flags,
                       *common_flags(plan, precision, plan.dpo_steps, lr or plan.dpo_lr, gpus)],
                      out / "logs" / f"{name}.log")
    records = train_records(run_dir)
    seconds = step_seconds(records)
    speed = throughput(seconds, [plan.micro_batch] * len(records), plan.warmup)
    tokens = throughput(seconds, [r["input_tokens"] for r in records], plan.warmup)
    from dialogtrain.train.metrics import read_metrics

    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_rewards/accuracies" in r]
    result = {"pairs_per_s": speed["per_s"], "tokens_per_s": tokens["per_s"], "timed_steps": speed["timed_steps"],
              "step_s_median": speed["step_s_median"], "eval_reward_accuracy": evals[-1]["eval_rewards/accuracies"],
              "eval_reward_margin": evals[-1]["eval_rewards/margins"], "precompute_s": 0.0, "precomputed_pairs": 0}
    if precompute:
        found = PRECOMPUTE_LINE.search(log)
        if not found:
            raise RuntimeError(f"{name}: no 'reference log-probs ... computed in' line in its output")
        result["precomputed_pairs"], result["precompute_s"] = int(found.group(1)), float(found.group(2))
    return result


def trl(script: str, config: dict, out: Path, name: str) -> dict:
    config_path, result_path = out / f"{name}.config.json", out / f"{name}.result.json"
    config_path.write_text(json.dumps(config, indent=2))
    run_checked([sys.executable, "-m", f"bench.{script}", str(config_path), str(result_path)],
                out / "logs" / f"{name}.log", env=quiet_env(OMP_NUM_THREADS=str(config["threads"])))
    return json.loads(result_path.read_text())


def trl_config(model: str, plan: Plan, precision: str, gpus: str = "cpu", **fields) -> dict:
    """A TRL script's config; `gpus` other than "cpu": TRL trains on the first visible GPU."""
    return {"model": model, "micro_batch": plan.micro_batch, "max_length": plan.max_length, "seed": plan.seed,
            "precision": precision, "warmup": plan.warmup, "threads": cores(),
            "device": "cpu" if gpus == "cpu" else "cuda", **fields}


# The memory settings of the "lean" memory runs: activations recomputed, and big blocks straight from and
# back to the kernel instead of kept in glibc's heaps (a run pays for both in time).
LEAN_FLAGS = {"gradient_checkpointing": True}
LEAN_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}

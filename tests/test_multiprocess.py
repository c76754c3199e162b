"""Several processes for real, through the `dialogtrain` command line, on the CPU (gloo).

Every run trains the same dropout-free tiny GPT-2 in fp32 for STEPS optimizer steps of one global batch
of 4 with the same seed, so every way of spreading it over processes must export the same weights:

    reference   1 process, ZeRO-0, micro-batch 2 x grad-accum 2, started as `--gpus 0` on a machine
                without a GPU (the single-device fallback)
    ZeRO 1-3    2 processes (`--gpus cpu --nproc 2`), micro-batch 2
    two nodes   2 launches `--nnodes 2 --node-rank 0|1 --master-addr 127.0.0.1`, one process each
    hostfile    the deepspeed launcher over pdsh/ssh to 127.0.0.1 and localhost, one slot each

lr 1e-4: Adam's first update is lr * g / (|g| + eps), so where |g| is near eps (1e-8) float rounding of
g moves it by up to lr; at 1e-4 that stays inside the tolerance. Dropout is off because every split of
the batch would draw different masks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from dialogtrain.train.metrics import read_metrics
from launcher.devices import FAKE_GPUS_ENV
from tests.sft_harness import free_port, write_pairs_csv

REPO = Path(__file__).resolve().parent.parent
STEPS, LR, SEED = 2, 1e-4, 3
TOLERANCE = 1e-4  # max abs difference of any exported weight
LAUNCH_TIMEOUT = 300
# What rank 0 prints about the world it joined (the launcher's own batch line ends differently).
WORLD_OF_TWO = "plan: 8 examples, global batch 4 = micro-batch 2 x grad-accum 1 x 2 processes"


@dataclass(frozen=True)
class Setup:
    model: Path
    data: Path
    root: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gpt2_dir) -> Setup:
    """The tiny GPT-2 of conftest with dropout off, and 8 query/response pairs (2 steps of 4)."""
    root = tmp_path_factory.mktemp("multiprocess")
    model = root / "gpt2-no-dropout"
    shutil.copytree(gpt2_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    (model / "config.json").write_text(json.dumps(config, indent=2))
    return Setup(model, write_pairs_csv(root / "pairs.csv"), root)


def train_args(setup: Setup, run_dir: Path, *more: str) -> list[str]:
    return ["sft", "--model", str(setup.model), "--data", str(setup.data), "--output", str(run_dir),
            "--precision", "fp32", "--lr", str(LR), "--max-steps", str(STEPS), "--seed", str(SEED), *more]


def launch_env(**more: str) -> dict[str, str]:
    """One thread per process: up to 2 processes share 2 cores with whatever else runs."""
    return {**os.environ, FAKE_GPUS_ENV: "0", "OMP_NUM_THREADS": "1", **more}


def dialogtrain(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`dialogtrain ARGS` as a user runs it, in its own session (so its leftovers can be found)."""
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env or launch_env(), timeout=LAUNCH_TIMEOUT, start_new_session=True)


def succeeded(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[name] - b[name]).abs().max().item() for name in a)


def losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(setup):
    """(the finished launch, its run folder, its final weights)."""
    run_dir = setup.root / "reference"
    done = succeeded(dialogtrain(*train_args(setup, run_dir, "--gpus", "0", "--micro-batch", "2",
                                             "--grad-accum", "2")))
    return done, run_dir, final_weights(run_dir)


def assert_same_training(run_dir: Path, reference) -> None:
    """The weights of `run_dir` are the reference's, and both moved well beyond the tolerance."""
    from safetensors.torch import load_file

    _, reference_dir, expected = reference
    start = load_file(str(reference_dir.parent / "gpt2-no-dropout" / "model.safetensors"))
    assert max_difference(expected, start) > 1.2 * TOLERANCE  # training did move them
    assert max_difference(final_weights(run_dir), expected) < TOLERANCE
    assert losses(run_dir) == pytest.approx(losses(reference_dir), abs=1e-5)


def test_single_device_fallback_trains_on_the_cpu(reference):
    done, run_dir, _ = reference
    notices = [line for line in done.stderr.splitlines() if line.startswith("note: ")]
    assert notices == ["note: --gpus 0: no GPU found (nvidia-smi lists none): running on the CPU"]
    assert "CUDA_VISIBLE_DEVICES='' DS_ACCELERATOR=cpu" in done.stdout and "--nproc-per-node 1 " in done.stdout
    assert "global batch 4 = micro-batch 2 x grad-accum 2 x 1 process" in done.stdout
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 1
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("zero", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3])
def test_two_processes_under_zero_export_the_single_process_weights(zero, setup, reference):
    run_dir = setup.root / f"zero{zero}"
    done = succeeded(dialogtrain(*train_args(setup, run_dir, "--gpus", "cpu", "--nproc", "2", "--zero", str(zero),
                                             "--micro-batch", "2")))
    assert WORLD_OF_TWO in done.stderr
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == zero
    assert_same_training(run_dir, reference)


def test_zero3_export_keeps_the_embeddings_tied(setup, reference):
    """ZeRO-3 partitions the weights; the export gathers them with DeepSpeed's consolidation, once."""
    from transformers import AutoModelForCausalLM

    run_dir = setup.root / "zero3"
    if not (run_dir / "final").is_dir():
        pytest.skip("needs the ZeRO-3 run of test_two_processes_under_zero_export_the_single_process_weights")
    assert "lm_head.weight" not in final_weights(run_dir)  # stored once, as transformer.wte.weight
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("final")) == ["final"]  # no leftovers


@pytest.mark.slow
def test_two_nodes_on_one_machine_form_one_world(setup, reference):
    """Two launches of the same command but --node-rank, started together, writing one --output."""
    run_dir, port = setup.root / "two-nodes", str(free_port())
    logs, nodes = [], []
    for rank in (0, 1):
        log = open(setup.root / f"node{rank}.log", "w+")
        args = train_args(setup, run_dir, "--gpus", "cpu", "--zero", "2", "--micro-batch", "2", "--nnodes", "2",
                          "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port)
        nodes.append(subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], stdout=log,
                                      stderr=subprocess.STDOUT, cwd=REPO, env=launch_env(), start_new_session=True))
        logs.append(log)
    try:
        codes = [node.wait(timeout=LAUNCH_TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            node.kill() if node.poll() is None else None
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert codes == [0, 0], "\n".join(output[-3000:] for output in outputs)
    # Rank 0 lives on node 0 and prints the world it joined; node 1's only worker is rank 1.
    assert "global batch 4 = micro-batch 2 x grad-accum 1 x 2 processes (2 nodes x 1)" in outputs[1]
    assert WORLD_OF_TWO in outputs[0] and "plan:" not in outputs[1]
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    assert_same_training(run_dir, reference)


def loopback_ssh_problem() -> str | None:
    """Why the hostfile test cannot run here, or None. `.ci/test-hosts` (run by `make test`) sets it up."""
    if not shutil.which("pdsh"):
        return "pdsh is not installed (.ci/test-hosts installs it)"
    for host in ("127.0.0.1", "localhost"):
        probe = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host, "true"],
                               capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            return f"ssh {host} without a password fails ({probe.stderr.strip()[:200]}); run .ci/test-hosts"
    return None


def test_hostfile_through_the_deepspeed_launcher(setup, reference):
    """pdsh over ssh to two loopback names, one slot each: one world of 2, the same weights."""
    problem = loopback_ssh_problem()
    if problem:
        pytest.skip(problem)
    hostfile = setup.root / "hosts"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    run_dir = setup.root / "hostfile"
    done = succeeded(dialogtrain(*train_args(setup, run_dir, "--gpus", "cpu", "--zero", "1", "--micro-batch", "2",
                                             "--hostfile", str(hostfile), "--master-addr", "127.0.0.1",
                                             "--master-port", str(free_port()))))
    output = done.stdout + done.stderr
    # pdsh prefixes each host's lines; rank 0 (on the first host) prints the world it joined.
    assert f"127.0.0.1: {WORLD_OF_TWO}" in output
    assert "localhost: [" in output and "dist_world_size=2" in output
    assert "DS_ACCELERATOR=cpu" in (run_dir / "deepspeed_env").read_text().splitlines()
    assert_same_training(run_dir, reference)


def processes_of(run_dir: Path) -> list[psutil.Process]:
    """Live processes whose command line names the run folder (torchrun and its workers)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(run_dir) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def test_a_failing_rank_fails_the_launch_and_leaves_no_process(setup):
    run_dir = setup.root / "failing"
    started = time.monotonic()
    done = dialogtrain(*train_args(setup, run_dir, "--gpus", "cpu", "--nproc", "2", "--micro-batch", "2"),
                       env=launch_env(DIALOGTRAIN_FAIL_RANK="1"))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "RuntimeError: DIALOGTRAIN_FAIL_RANK=1: rank 1 fails on purpose" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == \
        "error: rank 1 (local rank 1) exited with code 1; its output is above"
    assert processes_of(run_dir) == []
    assert not (run_dir / "final").exists()
    assert time.monotonic() - started < LAUNCH_TIMEOUT / 2  # rank 0 was stopped, not left waiting for rank 1

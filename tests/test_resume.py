"""Resume through the real command line, in subprocesses: a rank SIGKILLed mid-training under
--max-restarts, a kill in the middle of writing a checkpoint, resuming with another number of processes
(DeepSpeed's universal checkpoint under ZeRO-2 and ZeRO-3), the export of a two-process ZeRO-3
checkpoint, and command.sh in a folder whose path needs quoting.

The fault injection (DIALOGTRAIN_FAULT, see dialogtrain/checkpoints.py) picks the moment; the kill
itself is a real SIGKILL of the worker process, and the restart is torchrun's.
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.checkpoint_helpers import (
    FIXED_PEAK,
    assert_same_hf_folder,
    dialogtrain,
    final_weights,
    logged_steps,
    max_weight_difference,
    metrics_after,
    rewind,
    tail,
)
from tests.sft_harness import train_in_process, write_messages_jsonl, write_pairs_csv, write_run_dir

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fixed_peak_flops(monkeypatch):
    """In-process runs compared with subprocess runs draw the same random numbers (see FIXED_PEAK)."""
    for name, value in FIXED_PEAK.items():
        monkeypatch.setenv(name, value)


def train_args(model_dir, data, run_dir, *extra: str) -> list[str]:
    return ["sft", "--model", str(model_dir), "--data", str(data), "--output", str(run_dir), "--gpus", "cpu",
            "--precision", "fp32", *extra]


TWO_PROCESSES = ("--nproc", "2", "--zero", "3", "--micro-batch", "1", "--lr", "5e-3", "--max-steps", "8",
                 "--save-every", "2")


@pytest.fixture(scope="module")
def two_process_run(gpt2_dir, tmp_path_factory):
    """Uninterrupted: 2 CPU processes under ZeRO-3, the tiny GPT-2 (tied embeddings, dropout on), 8 steps over
    two epochs, a checkpoint every 2 steps."""
    tmp = tmp_path_factory.mktemp("two-processes")
    data = write_pairs_csv(tmp / "pairs.csv")
    done = dialogtrain(*train_args(gpt2_dir, data, tmp / "run", *TWO_PROCESSES))
    assert done.returncode == 0, tail(done)
    return tmp / "run", data


def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_uninterrupted(two_process_run, gpt2_dir, tmp_path):
    """Rank 1 is SIGKILLed right after step 5 (the latest checkpoint is step 4). torchrun restarts both
    workers, which resume from step 4 by themselves: steps 5-8 and the final weights are the same."""
    run_dir, data = two_process_run
    killed = tmp_path / "killed"
    done = dialogtrain(*train_args(gpt2_dir, data, killed, *TWO_PROCESSES, "--max-restarts", "1"),
                       env={"DIALOGTRAIN_FAULT": "kill-at-step:5:1"})
    assert done.returncode == 0, tail(done)
    assert f"resume: {killed / 'checkpoints' / 'step-000004'} (step 4, epoch 0, 4 steps into it)" in done.stderr
    assert logged_steps(killed) == list(range(1, 9))
    assert metrics_after(killed, 4) == metrics_after(run_dir, 4)
    want, got = final_weights(run_dir / "final"), final_weights(killed / "final")
    assert all(torch.equal(want[name], got[name]) for name in want)


def test_without_max_restarts_a_killed_rank_ends_the_launch_with_its_signal(two_process_run, gpt2_dir, tmp_path):
    run_dir, data = two_process_run
    done = dialogtrain(*train_args(gpt2_dir, data, tmp_path / "killed", *TWO_PROCESSES),
                       env={"DIALOGTRAIN_FAULT": "kill-at-step:3:1"})
    assert done.returncode != 0
    assert "error: rank 1 (local rank 1) was killed by signal SIGKILL" in done.stderr
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "step-000002"


def test_the_export_of_a_two_process_zero3_checkpoint_equals_final(two_process_run, tmp_path):
    run_dir, _ = two_process_run
    done = dialogtrain("export", str(run_dir / "checkpoints" / "step-000008"), "--output", str(tmp_path / "hf"))
    assert done.returncode == 0, tail(done)
    assert_same_hf_folder(run_dir / "final", tmp_path / "hf")


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_as_latest(gpt2_dir, tmp_path):
    """SIGKILL after the first file of the checkpoint of step 4 (ZeRO-2: model states written, optimizer
    shard not): step 2 stays `latest`, and `--resume` continues from it to the uninterrupted result."""
    data = write_pairs_csv(tmp_path / "pairs.csv")
    flags = ("--zero", "2", "--micro-batch", "2", "--lr", "5e-3", "--max-steps", "6", "--save-every", "2")
    run_dir = tmp_path / "run"
    killed = dialogtrain(*train_args(gpt2_dir, data, run_dir, *flags), env={"DIALOGTRAIN_FAULT": "kill-during-save:4"})
    assert killed.returncode == 128 + 9, tail(killed)
    assert "error: rank 0 (local rank 0) was killed by signal SIGKILL" in killed.stderr
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step-000002"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000002", "step-000004.tmp"]
    assert [p.name for p in (root / "step-000004.tmp").iterdir()] == ["mp_rank_00_model_states.pt"]

    resumed = dialogtrain(*train_args(gpt2_dir, data, run_dir, *flags, "--resume"))
    assert resumed.returncode == 0, tail(resumed)
    assert f"resume: {root / 'step-000002'} (step 2, epoch 0, 2 steps into it)" in resumed.stderr
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000002", "step-000004", "step-000006"]
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]

    uninterrupted = tmp_path / "uninterrupted"
    train_in_process(write_run_dir(uninterrupted, model=str(gpt2_dir), data=str(data), zero=2, micro_batch=2,
                                   lr=5e-3, max_steps=6, save_every=2, precision="fp32", gpus="cpu"))
    assert metrics_after(run_dir, 2) == metrics_after(uninterrupted, 2)
    assert max_weight_difference(run_dir / "final", uninterrupted / "final") == 0.0


@pytest.mark.parametrize("zero", [2, 3])
def test_resuming_with_another_number_of_processes(zero, llama_dir, tmp_path):
    """1 process -> 2 processes -> 1 process under ZeRO-2/3 (the same global batch of 4: micro-batch 2 x
    grad-accum 2 x 1, or 2 x 1 x 2), through DeepSpeed's universal checkpoint: the run ends with the weights
    of the uninterrupted single-process run, to float rounding (the split into processes reorders sums)."""
    data = write_messages_jsonl(tmp_path / "chats.jsonl")
    flags = dict(model=str(llama_dir), data=str(data), zero=zero, lr=1e-3, max_steps=6, save_every=2,
                 precision="fp32", gpus="cpu")
    one = tmp_path / "one-process"
    train_in_process(write_run_dir(one, micro_batch=2, grad_accum=2, **flags))

    two = rewind(one, tmp_path / "then-two", step=2)
    done = dialogtrain(*train_args(llama_dir, data, two, "--nproc", "2", "--zero", str(zero), "--micro-batch", "2",
                                   "--lr", "1e-3", "--max-steps", "6", "--save-every", "2", "--resume"))
    assert done.returncode == 0, tail(done)
    assert "through a universal checkpoint (written by 1 processes, resumed by 2)" in done.stderr
    assert (two / "checkpoints" / "step-000002" / "universal").is_dir()
    assert max_weight_difference(one / "final", two / "final") < 1e-5
    assert [r["loss"] for r in metrics_after(two, 2)] == pytest.approx([r["loss"] for r in metrics_after(one, 2)],
                                                                       rel=1e-5)

    back = rewind(two, tmp_path / "back-to-one", step=4)  # its step 4 was written by 2 processes
    train_in_process(write_run_dir(back, micro_batch=2, grad_accum=2, resume="auto", **flags))
    assert max_weight_difference(one / "final", back / "final") < 1e-5


def test_command_sh_runs_again_from_a_folder_whose_path_needs_quoting(gpt2_dir, tmp_path):
    folder = tmp_path / "it's a \"run\" with $HOME & spaces"
    data = write_pairs_csv(tmp_path / "pairs; rm -rf ~.csv")
    done = dialogtrain(*train_args(gpt2_dir, data, folder, "--micro-batch", "4", "--max-steps", "1"))
    assert done.returncode == 0, tail(done)
    (folder / "final").rename(folder / "first-final")
    again = subprocess.run(["bash", str(folder / "command.sh")], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (folder / "final" / "model.safetensors").exists() and logged_steps(folder) == [1]
    assert max_weight_difference(folder / "first-final", folder / "final") == 0.0

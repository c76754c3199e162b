"""Checkpoints and resume, in-process (one process, the real SFT and DPO workers): exact continuation
mid-epoch under ZeRO-0 and ZeRO-2, the checkpoint folder, refused and forced resumes, safe loading, a
NaN loss, fp16 skipped steps, a failed save, --keep-last, and output folders that cannot take a run.

The multi-process cases (a killed rank, a kill during a save, another number of processes) are in
test_resume.py; the export of a checkpoint in test_export_cmd.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from dialogtrain.data.sources import data_fingerprint
from dialogtrain.errors import TrainingError, UserError
from dialogtrain.options import RunOptions
from dialogtrain.train.checkpoints import Checkpoints, safe_torch_load
from dialogtrain.train.distributed import World
from dialogtrain.train.loop import check_loss, report_skipped_steps
from tests.checkpoint_helpers import final_weights, logged_steps, metrics_after, rerecord, rewind
from tests.sft_harness import train_in_process, write_pairs_csv, write_run_dir

# 8 pairs, global batch 2: 4 steps per epoch, so step 6 is 2 steps into epoch 1 (mid-epoch), and the
# checkpoint of step 9 is the last one and the run's end.
SFT_FLAGS = dict(micro_batch=2, lr=5e-3, max_steps=9, eval_every=4, save_every=3, precision="fp32", gpus="cpu",
                 keep_overlap=True)  # the eval file holds the training pairs


@pytest.fixture(scope="module", params=[0, 2], ids=["zero0", "zero2"])
def sft_run(request, gpt2_dir, tmp_path_factory):
    """An uninterrupted SFT run of the tiny GPT-2 (dropout on: the RNG state matters) with checkpoints at
    steps 3, 6 and 9. Returns (run folder, its flags)."""
    tmp = tmp_path_factory.mktemp(f"sft-zero{request.param}")
    flags = dict(SFT_FLAGS, model=str(gpt2_dir), data=str(write_pairs_csv(tmp / "pairs.csv")),
                 eval_data=str(write_pairs_csv(tmp / "eval.csv")), zero=request.param)
    train_in_process(write_run_dir(tmp / "run", **flags))
    return tmp / "run", flags


def test_a_run_resumed_mid_epoch_continues_exactly(sft_run, tmp_path):
    """Resumed from step 6 (epoch 1, 2 steps in): the same batches, dropout draws, learning rates and
    evaluations as the uninterrupted run, and bit-identical final weights."""
    run_dir, flags = sft_run
    resumed = rewind(run_dir, tmp_path / "resumed", step=6)
    train_in_process(write_run_dir(resumed, resume="auto", **flags))
    assert logged_steps(resumed) == list(range(1, 10))  # steps 7-9 logged once, the killed run's trimmed
    expected = metrics_after(run_dir, 6)
    assert [r["step"] for r in expected] == [7, 8, 9] and "eval_loss" in expected[1]
    assert metrics_after(resumed, 6) == expected
    want, got = final_weights(run_dir / "final"), final_weights(resumed / "final")
    assert all(torch.equal(want[name], got[name]) for name in want)


def test_without_the_saved_position_or_rng_the_continuation_differs(sft_run, tmp_path):
    """What the equality above rests on: a resume that restarted the epoch, or kept the RNG it was seeded
    with, would train on other batches or other dropout masks."""
    run_dir, flags = sft_run
    expected = metrics_after(run_dir, 6)
    restarted_epoch = rewind(run_dir, tmp_path / "restarted-epoch", step=6)
    progress_file = restarted_epoch / "checkpoints" / "step-000006" / "progress.json"
    progress_file.write_text(json.dumps({**json.loads(progress_file.read_text()), "position": 0}))
    train_in_process(write_run_dir(restarted_epoch, resume="auto", **flags))
    assert [r["target_tokens"] for r in metrics_after(restarted_epoch, 6)] != [r["target_tokens"] for r in expected]

    seeded_rng = rewind(run_dir, tmp_path / "seeded-rng", step=6)
    (seeded_rng / "checkpoints" / "step-000006" / "rng-rank00000.safetensors").unlink()
    rerecord(seeded_rng / "checkpoints" / "step-000006", "rng-rank00000.safetensors")
    train_in_process(write_run_dir(seeded_rng, resume="auto", **flags))
    got = metrics_after(seeded_rng, 6)
    assert [r["target_tokens"] for r in got] == [r["target_tokens"] for r in expected]
    assert got[0]["loss"] != expected[0]["loss"]


def test_the_checkpoint_folder_is_complete_self_describing_and_safe_to_load(sft_run):
    from safetensors import safe_open

    run_dir, flags = sft_run
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step-000009"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000003", "step-000006", "step-000009"]
    folder = root / "step-000006"
    progress = json.loads((folder / "progress.json").read_text())
    assert (progress["step"], progress["epoch"], progress["position"]) == (6, 1, 2)
    assert progress["world_size"] == 1 and progress["zero"] == flags["zero"] and progress["dtype"] == "float32"
    assert progress["data_fingerprints"] == {"data": data_fingerprint(flags["data"]),
                                             "eval_data": data_fingerprint(flags["eval_data"])}
    assert progress["options"]["lr"] == 5e-3 and progress["options"]["global_batch"] == 2
    assert "micro_batch" not in progress["options"] and "output" not in progress["options"]
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(progress["files"]) == [name for name in on_disk if name != "progress.json"]
    for name, record in progress["files"].items():
        assert record == {"size": (folder / name).stat().st_size,
                          "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()}, name
    assert "packing" not in progress["options"]  # a layout: resuming packed or padded trains the same
    assert progress["options"]["trust_remote_code"] is False  # model code runs only when asked
    with safe_open(str(folder / "rng-rank00000.safetensors"), framework="pt") as rng:
        assert set(rng.keys()) >= {"python", "numpy", "torch"}
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in (folder / "hf").iterdir()}
    shards = sorted(folder.glob("*.pt"))
    assert shards and all(torch.load(shard, weights_only=True) for shard in shards if "optim" not in shard.name)
    with safe_torch_load():  # ZeRO's optimizer shards need DeepSpeed's own classes, allow-listed
        assert all(torch.load(shard, weights_only=False) for shard in shards)


def test_changed_data_or_options_are_refused_with_what_changed(sft_run, tmp_path, capfd):
    run_dir, flags = sft_run
    resumed = rewind(run_dir, tmp_path / "resumed", step=6)
    with pytest.raises(UserError) as refused:
        train_in_process(write_run_dir(resumed, resume="auto", **{**flags, "lr": 1e-3, "max_steps": 12}))
    message = str(refused.value)
    assert message.startswith(f"cannot resume from {resumed / 'checkpoints' / 'step-000006'}: ")
    assert "--lr changed: 0.005 -> 0.001" in message and "--max-steps changed: 9 -> 12" in message
    assert "--resume-force" in message

    data = Path(flags["data"]).with_name("changed.csv")
    data.write_text(Path(flags["data"]).read_text().replace("hello there", "hello here"))
    with pytest.raises(UserError, match="--data .*changed.csv: not the data the checkpoint was trained on"):
        train_in_process(write_run_dir(resumed, resume="auto", **{**flags, "data": str(data)}))
    assert not (resumed / "final").exists()

    # --resume-force continues anyway and says what differs.
    train_in_process(write_run_dir(resumed, resume="auto", resume_force=True, **{**flags, "lr": 1e-3}))
    assert "--resume-force: resuming although --lr changed: 0.005 -> 0.001" in capfd.readouterr().err
    assert logged_steps(resumed) == list(range(1, 10))


def test_the_launcher_refuses_a_changed_resume_before_writing_anything(sft_run, tmp_path, monkeypatch):
    import sys

    from click.testing import CliRunner

    from launcher import cli as cli_module

    run_dir, flags = sft_run
    resumed = rewind(run_dir, tmp_path / "resumed", step=6)
    monkeypatch.setattr("launcher.launch.launch_argv", lambda *args, **kwargs: [sys.executable, "-c", "pass"])
    before = (resumed / "run.json").read_text()

    def launch(*extra: str):
        args = ["sft", "--model", flags["model"], "--data", flags["data"], "--eval-data", flags["eval_data"],
                "--output", str(resumed), "--gpus", "cpu", "--micro-batch", "2", "--max-steps", "9",
                "--save-every", "3", "--eval-every", "4", "--zero", str(flags["zero"]), "--precision", "fp32",
                *extra]
        return CliRunner().invoke(cli_module.cli, args)

    refused = launch("--resume", "--lr", "1e-3")
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "--resume auto: cannot resume from" in refused.output and "--lr changed: 0.005 -> 0.001" in refused.output
    assert (resumed / "run.json").read_text() == before
    assert launch("--lr", "5e-3").exit_code == 2  # neither --resume nor --overwrite: the folder holds a run
    assert launch("--resume", "--overwrite").exit_code == 2
    accepted = launch("--resume", "--lr", "5e-3")
    assert accepted.exit_code == 0, accepted.output
    assert json.loads((resumed / "run.json").read_text())["launch"]["resume"] == "auto"
    missing = launch("--resume", str(tmp_path / "nowhere"), "--lr", "5e-3")
    assert missing.exit_code == 2 and "no such checkpoint folder" in missing.output


class Payload:
    """Unpickling this runs code: what a tampered checkpoint file could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_a_checkpoint_holding_pickled_code_is_refused_unrun(sft_run, tmp_path):
    run_dir, flags = sft_run
    resumed = rewind(run_dir, tmp_path / "resumed", step=6)
    marker = tmp_path / "code-ran"
    torch.save({"module": Payload(marker)}, resumed / "checkpoints" / "step-000006" / "mp_rank_00_model_states.pt")
    rerecord(resumed / "checkpoints" / "step-000006", "mp_rank_00_model_states.pt")  # progress.json tampered too
    with pytest.raises(UserError, match="refusing to load it: a file holds Python objects"):
        train_in_process(write_run_dir(resumed, resume="auto", **flags))
    assert not marker.exists()


def test_a_nan_loss_names_the_step_and_the_last_good_checkpoint(gpt2_dir, tmp_path, monkeypatch):
    """An injected NaN at step 5: exit code 3, the message names step 5 and the checkpoint of step 4;
    nothing of step 5 is logged or saved, no final/."""
    import dialogtrain.sft as sft

    calls, sft_loss = [], sft.sft_loss

    def nan_from_step_5(*args):
        calls.append(1)
        return sft_loss(*args) * (float("nan") if len(calls) >= 5 else 1.0)

    monkeypatch.setattr(sft, "sft_loss", nan_from_step_5)
    run_dir = tmp_path / "run"
    run_json = write_run_dir(run_dir, model=str(gpt2_dir), data=str(write_pairs_csv(tmp_path / "pairs.csv")),
                             micro_batch=2, max_steps=8, save_every=2, precision="fp32", gpus="cpu")
    with pytest.raises(TrainingError) as stopped:
        train_in_process(run_json)
    last_good = run_dir / "checkpoints" / "step-000004"
    assert str(stopped.value).startswith("loss is nan at step 5; stopping, nothing of this step is saved. ")
    assert f"The last good checkpoint is {last_good} (step 4)" in str(stopped.value)
    assert stopped.value.exit_code == 3
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-000004"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    assert logged_steps(run_dir) == [1, 2, 3, 4] and not (run_dir / "final").exists()


class StubEngine:
    """What check_loss reads of a DeepSpeed engine: an fp16 run's GradScaler (torch_autocast), skips so far."""

    def __init__(self, fp16: bool, skipped_steps: int):
        self.torch_autocast_z0_gradscaler = object() if fp16 else None
        self.optimizer, self.skipped_steps = None, skipped_steps


def test_fp16_overflows_are_counted_and_reported_not_fatal(tmp_path, capfd):
    """Under fp16 dynamic loss scaling an overflowing update is skipped: counted in the metrics (and flagged
    on its step) and reported at the end. A non-finite loss of an applied update, or any in fp32/bf16,
    stops the run."""
    options = RunOptions.from_flat("sft", {"model": "m", "data": "d", "output": str(tmp_path)})
    checkpoints = Checkpoints(tmp_path, options, World(0, 0, 1, torch.device("cpu")), {}, None)
    assert check_loss(StubEngine(True, 3), float("inf"), 7, True, checkpoints) == {"skipped_steps": 3,
                                                                                   "skipped": True}
    assert check_loss(StubEngine(True, 4), float("nan"), 8, True, checkpoints) == {"skipped_steps": 4,
                                                                                   "skipped": True}
    assert check_loss(StubEngine(True, 4), 2.5, 9, False, checkpoints) == {"skipped_steps": 4}
    assert check_loss(StubEngine(False, 0), 2.5, 9, False, checkpoints) == {}
    with pytest.raises(TrainingError, match="loss is nan at step 10; .*No checkpoint was written yet"):
        check_loss(StubEngine(True, 4), float("nan"), 10, False, checkpoints)
    with pytest.raises(TrainingError, match="loss is inf at step 3"):
        check_loss(StubEngine(False, 0), float("inf"), 3, False, checkpoints)
    report_skipped_steps(StubEngine(True, 4), 100, checkpoints.world)
    report_skipped_steps(StubEngine(False, 0), 100, checkpoints.world)
    assert capfd.readouterr().err == ("fp16: 4 of 100 optimizer steps were skipped (gradient overflow; the loss "
                                      "scale was lowered each time)\n")


def test_a_failed_save_keeps_the_previous_checkpoint_and_keep_last_prunes(gpt2_dir, tmp_path, monkeypatch):
    """A save failing as on a full disk (injected in the first shard of step 4) stops the run with exit
    code 3 and leaves step 3 as latest, loadable; --keep-last 2 had already removed step 1."""
    run_dir = tmp_path / "run"
    flags = dict(model=str(gpt2_dir), data=str(write_pairs_csv(tmp_path / "pairs.csv")), micro_batch=2,
                 max_steps=6, save_every=1, keep_last=2, zero=2, precision="fp32", gpus="cpu")
    monkeypatch.setenv("DIALOGTRAIN_FAULT", "fail-save:4")
    with pytest.raises(TrainingError) as stopped:
        train_in_process(write_run_dir(run_dir, **flags))
    assert str(stopped.value).startswith(f"could not write the checkpoint of step 4 in {run_dir / 'checkpoints'} "
                                         "(")
    assert "No space left on device" in str(stopped.value)
    assert f"The last good checkpoint is {run_dir / 'checkpoints' / 'step-000003'} (step 3)" in str(stopped.value)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-000003"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]

    monkeypatch.delenv("DIALOGTRAIN_FAULT")
    train_in_process(write_run_dir(run_dir, resume="auto", **flags))
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6] and (run_dir / "final" / "model.safetensors").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000005", "step-000006"]


def test_an_unwritable_run_folder_is_reported_before_training(gpt2_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_json = write_run_dir(run_dir, model=str(gpt2_dir), data=str(tmp_path / "not-read-yet.csv"),
                             save_every=2, gpus="cpu")
    (run_dir / "checkpoints").write_text("a file where the checkpoints folder goes")
    with pytest.raises(UserError, match=f"--output {run_dir}: cannot write in {run_dir / 'checkpoints'} "):
        train_in_process(run_json)  # before the data (a missing file) is even looked at


def test_a_run_folder_without_room_for_a_checkpoint_is_refused(gpt2_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import dialogtrain.train.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "free_bytes", lambda path: 10_000)
    run_json = write_run_dir(tmp_path / "run", model=str(gpt2_dir), data=str(write_pairs_csv(tmp_path / "p.csv")),
                             save_every=2, zero=2, gpus="cpu")
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(gpt2_dir).parameters())  # tied once
    with pytest.raises(UserError) as refused:
        train_in_process(run_json)
    assert str(refused.value) == (
        f"--output {tmp_path / 'run'}: 0.00 GB free, but a checkpoint ({params:,} parameters x 16 bytes) and the "
        f"final export (4 bytes each) need about {params * 20 / 1e9:.2f} GB; free some space or choose another "
        "--output")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_launcher_reports_an_output_it_cannot_create():
    from click.testing import CliRunner

    from launcher.cli import cli

    result = CliRunner().invoke(cli, ["sft", "--model", "m", "--data", "d.csv", "--output",
                                      "/proc/dialogtrain-test/run", "--gpus", "cpu", "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--output /proc/dialogtrain-test/run: cannot write in /proc" in result.output


def test_dpo_resume_reuses_the_precomputed_reference(llama_dir, tmp_path, monkeypatch):
    """DPO with --precompute-ref resumed mid-run: RUN/ref_logps.pt is reused (no reference model is
    loaded) and the run ends exactly as the uninterrupted one."""
    import dialogtrain.train.reference as reference
    from tests.test_dpo import QUESTIONS, write_preferences_jsonl

    flags = dict(command="dpo", model=str(llama_dir), data=str(write_preferences_jsonl(tmp_path / "p.jsonl",
                 QUESTIONS[:8])), micro_batch=2, lr=1e-2, max_steps=6, save_every=2, precompute_ref=True,
                 precision="fp32", gpus="cpu")
    run_dir = tmp_path / "run"
    train_in_process(write_run_dir(run_dir, **flags), "dpo")
    resumed = rewind(run_dir, tmp_path / "resumed", step=2)
    cache_mtime = (resumed / "ref_logps.pt").stat().st_mtime_ns

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference model was loaded although the cache matches")

    monkeypatch.setattr(reference, "load_reference_engine", no_reference)
    train_in_process(write_run_dir(resumed, resume="auto", **flags), "dpo")
    assert (resumed / "ref_logps.pt").stat().st_mtime_ns == cache_mtime
    assert metrics_after(resumed, 2) == metrics_after(run_dir, 2)
    want, got = final_weights(run_dir / "final"), final_weights(resumed / "final")
    assert all(torch.equal(want[name], got[name]) for name in want)


def test_a_restarted_worker_resumes_from_latest_by_itself(sft_run, tmp_path, monkeypatch):
    """torchrun sets TORCHELASTIC_RESTART_COUNT in a restarted worker: without --resume it continues from
    the run's latest checkpoint (here step 6)."""
    run_dir, flags = sft_run
    restarted = rewind(run_dir, tmp_path / "restarted", step=6)  # its run.json has no --resume
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    train_in_process(restarted / "run.json")
    assert metrics_after(restarted, 6) == metrics_after(run_dir, 6)


# --- damaged checkpoints: every file's size and sha256 is recorded and checked ---------------------

def damage_file(folder: Path, how: str) -> str:
    """Damage the model states file of a checkpoint folder the way `how` says; returns its name."""
    name = "mp_rank_00_model_states.pt"
    path = folder / name
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "flipped":
        middle = len(data) // 2  # inside a tensor's bytes, so the file still unpickles
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:])
    else:
        path.unlink()
    return name


@pytest.mark.parametrize("how, why", [("truncated", "has {size} bytes, {written} were written"),
                                      ("flipped", "is damaged (its sha256 differs from the one recorded"),
                                      ("missing", "is missing")])
def test_resume_auto_falls_back_to_the_newest_checkpoint_that_verifies(sft_run, tmp_path, capfd, how, why):
    """The newest checkpoint damaged (cut in half, one bit flipped inside a tensor, or a file gone):
    --resume auto says which and why, continues from the one before, and ends as the uninterrupted run."""
    run_dir, flags = sft_run
    resumed = rewind(run_dir, tmp_path / "resumed", step=6)
    newest = resumed / "checkpoints" / "step-000006"
    written = newest.joinpath("mp_rank_00_model_states.pt").stat().st_size
    name = damage_file(newest, how)
    size = (newest / name).stat().st_size if (newest / name).exists() else 0
    capfd.readouterr()
    train_in_process(write_run_dir(resumed, resume="auto", **flags))
    err = capfd.readouterr().err
    reason = why.format(size=size, written=written)
    assert f"resume: passing over step-000006: {newest / name} {reason}" in err
    assert f"resume: {resumed / 'checkpoints' / 'step-000003'} (step 3, epoch 0, 3 steps into it)" in err
    assert metrics_after(resumed, 3) == metrics_after(run_dir, 3)
    want, got = final_weights(run_dir / "final"), final_weights(resumed / "final")
    assert all(torch.equal(want[name], got[name]) for name in want)


def test_a_damaged_checkpoint_named_by_path_is_refused_naming_the_file_and_the_newest_good_one(sft_run, tmp_path):
    from click.testing import CliRunner

    from launcher.cli import cli

    run_dir, flags = sft_run
    resumed = rewind(run_dir, tmp_path / "resumed", step=6)
    damaged = resumed / "checkpoints" / "step-000006"
    name = damage_file(damaged, "flipped")
    good = resumed / "checkpoints" / "step-000003"
    expected = (f"checkpoint {damaged}: {damaged / name} is damaged (its sha256 differs from the one recorded when "
                f"it was written); the newest good checkpoint is {good}")
    with pytest.raises(UserError) as refused:  # the workers compare sha256
        train_in_process(write_run_dir(resumed, resume=str(damaged), **flags))
    assert str(refused.value) == expected
    assert not (resumed / "final").exists()

    (damaged / name).write_bytes((damaged / name).read_bytes()[:100])  # the launcher compares sizes first
    args = ["sft", "--model", flags["model"], "--data", flags["data"], "--eval-data", flags["eval_data"],
            "--output", str(resumed), "--gpus", "cpu", "--micro-batch", "2", "--max-steps", "9", "--save-every",
            "3", "--eval-every", "4", "--lr", "5e-3", "--zero", str(flags["zero"]), "--precision", "fp32",
            "--resume", str(damaged)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{damaged / name} has 100 bytes" in result.output and f"the newest good checkpoint is {good}" in result.output

    from dialogtrain.export.checkpoint import export_checkpoint

    with pytest.raises(UserError, match=f"{damaged / name} has 100 bytes.*the newest good checkpoint is {good}"):
        export_checkpoint(damaged, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()

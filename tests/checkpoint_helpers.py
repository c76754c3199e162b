"""Helpers of the checkpoint, resume and export tests: comparing runs, rewinding a run folder to one of
its checkpoints (what a run killed after that checkpoint leaves), and the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from dialogtrain.train.metrics import read_metrics


def deterministic(record: dict) -> dict:
    """A metrics record without what depends on the clock (tokens_per_s, mfu, ...)."""
    return {k: v for k, v in record.items()
            if k in ("step", "epoch", "loss", "lr", "grad_norm", "input_tokens", "target_tokens", "skipped_steps")
            or k.startswith(("eval_", "rewards/", "logps/"))}


def metrics_after(run_dir: Path, step: int) -> list[dict]:
    return [deterministic(r) for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > step]


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def max_weight_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between the weights of two Hugging Face folders (same tensor names)."""
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[name].double() - wb[name].double()).abs().max().item() for name in wa)


def rewind(run_dir: Path, copy: Path, step: int) -> Path:
    """A copy of `run_dir` as a run stopped right after its checkpoint of `step` leaves it: no final/, no
    later checkpoint, `latest` naming that one; metrics.jsonl keeps the later steps (the resume trims them)."""
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "final", ignore_errors=True)
    for folder in (copy / "checkpoints").glob("step-*"):
        if int(folder.name.split("-")[1].split(".")[0]) > step:
            shutil.rmtree(folder)
    (copy / "checkpoints" / "latest").write_text(f"step-{step:06d}")
    return copy


def rerecord(folder: Path, name: str) -> None:
    """Record the file `name` of a checkpoint folder as it is now in its progress.json (size, sha256), or
    drop its record when the file is gone: a checkpoint written that way, so that the manifest check
    passes and what the test changed is what the resume meets."""
    from dialogtrain.train.resume import PROGRESS, file_record

    progress = json.loads((folder / PROGRESS).read_text())
    if (folder / name).exists():
        progress["files"][name] = file_record(folder / name)
    else:
        del progress["files"][name]
    (folder / PROGRESS).write_text(json.dumps(progress))


def with_options(run_dir: Path, **changes) -> Path:
    """Rewrite RUN/run.json with some options changed (field names), as a relaunch with other flags would."""
    path = run_dir / "run.json"
    options = json.loads(path.read_text())
    for name, value in changes.items():
        section = next(s for s, fields in options.items() if isinstance(fields, dict) and name in fields)
        options[section][name] = value
    path.write_text(json.dumps(options, indent=2))
    return path


# metrics.peak_flops times random matmuls drawn from the global torch RNG, for as long as the machine's
# speed allows: under load it draws a different amount, and dropout then differs between two fresh runs.
# A given peak skips the measurement, so fresh runs started apart can be compared exactly.
FIXED_PEAK = {"DIALOGTRAIN_PEAK_FLOPS": "1e12"}


def dialogtrain(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real command line in a subprocess (its workers under torchrun)."""
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **FIXED_PEAK, **(env or {})})


def tail(done: subprocess.CompletedProcess, chars: int = 4000) -> str:
    return (done.stdout + done.stderr)[-chars:]


def assert_same_hf_folder(expected: Path, got: Path) -> None:
    """The same Hugging Face folder: file names, bit-identical tensors, configs, tokenizer files."""
    assert sorted(p.name for p in expected.iterdir()) == sorted(p.name for p in got.iterdir())
    want, have = final_weights(expected), final_weights(got)
    assert want.keys() == have.keys()
    for name in want:
        assert want[name].dtype == have[name].dtype and torch.equal(want[name], have[name]), name
    for path in expected.iterdir():
        if path.suffix == ".json":
            assert json.loads(path.read_text()) == json.loads((got / path.name).read_text()), path.name
        elif path.name != "model.safetensors":
            assert path.read_bytes() == (got / path.name).read_bytes(), path.name

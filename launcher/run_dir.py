"""The run folder (`--output RUN`): when the launcher refuses it, and what it writes there before
anything starts (run.json, ds_config.json, command.sh)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from dialogtrain.errors import UserError
from dialogtrain.options import RunOptions

LAUNCH_FILES = ("run.json", "ds_config.json", "command.sh")
RESULTS = ("checkpoints", "final", "metrics.jsonl")  # exist once a run has started training
TRACKER_OUTPUTS = ("tensorboard", "mlruns", "wandb", "trackers.json")  # --report-to's, local


def run_folder_problem(output: str, overwrite: bool, resume: str | None = None) -> str | None:
    """Why `--output` cannot take this run, or None.

    A folder holding results of an earlier run (checkpoints/, final/, metrics.jsonl) is refused
    unless --overwrite (replace that run) or --resume (continue it), so that a typo never mixes two
    runs; a folder with only launch files (a run that failed before its first step) or unrelated files
    is fine. The folder, or the nearest existing folder above it, must be writable.
    """
    run = Path(output)
    if run.exists() and not run.is_dir():
        return f"--output {output}: exists and is not a folder"
    if overwrite and resume:
        return f"--overwrite deletes the checkpoints --resume {resume} would continue from; give one of them"
    found = [name for name in RESULTS if (run / name).exists()]
    if found and not overwrite and not resume:
        return (f"--output {output} already holds a run ({', '.join(found)}); "
                f"choose a new --output, or add --overwrite to replace that run, or --resume to continue it")
    return unwritable_problem(run)


def unwritable_problem(run: Path) -> str | None:
    """Why the run folder cannot be created or written (probed with a temporary file), or None."""
    folder = run.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"--output {run}: {folder} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return f"--output {run}: cannot write in {folder} ({err.strerror or err})"
    return None


def clear_previous_run(run: Path) -> list[str]:
    """For --overwrite: remove what an earlier run wrote in `run` (its trackers' local files too, so a new
    run does not mix with the old one's curves); other files stay. Returns what went."""
    removed = []
    for name in (*RESULTS, *LAUNCH_FILES, *TRACKER_OUTPUTS):
        path = run / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def write_run_dir(run: Path, options: RunOptions, ds_config: dict, command_script: str) -> None:
    """RUN/run.json, RUN/ds_config.json and RUN/command.sh (executable); creates RUN."""
    try:
        run.mkdir(parents=True, exist_ok=True)
        options.save(run / "run.json")
        (run / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        script = run / "command.sh"
        script.write_text(command_script)
        script.chmod(0o755)
    except OSError as err:
        raise UserError(f"--output {run}: cannot write the run folder ({err.strerror or err})") from None


def resume_problems(options: RunOptions) -> list[str]:
    """Why this run's --resume would be refused (a missing checkpoint, changed data or options), checked
    before run.json is rewritten; [] without --resume, or with --resume-force for changes."""
    if options.launch.resume is None:
        return []
    from dialogtrain.train.resume import launch_resume_problems  # torch-free

    return launch_resume_problems(options)

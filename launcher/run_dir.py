"""The run folder (`--output RUN`): when the launcher refuses it, and what it writes there before
anything starts (run.json, ds_config.json, command.sh)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dialogtrain.options import RunOptions

LAUNCH_FILES = ("run.json", "ds_config.json", "command.sh")
RESULTS = ("checkpoints", "final", "metrics.jsonl")  # exist once a run has started training


def run_folder_problem(output: str, overwrite: bool) -> str | None:
    """Why `--output` cannot take a new run, or None.

    A folder holding results of an earlier run (checkpoints/, final/, metrics.jsonl) is refused
    unless --overwrite, so that a typo never mixes two runs; a folder with only launch files (a
    run that failed before its first step) or unrelated files is fine.
    """
    run = Path(output)
    if run.exists() and not run.is_dir():
        return f"--output {output}: exists and is not a folder"
    found = [name for name in RESULTS if (run / name).exists()]
    if found and not overwrite:
        return (f"--output {output} already holds a run ({', '.join(found)}); "
                f"choose a new --output, or add --overwrite to replace that run")
    return None


def clear_previous_run(run: Path) -> list[str]:
    """For --overwrite: remove what an earlier run wrote in `run`; other files stay. Returns what went."""
    removed = []
    for name in (*RESULTS, *LAUNCH_FILES):
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
    run.mkdir(parents=True, exist_ok=True)
    options.save(run / "run.json")
    (run / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    script = run / "command.sh"
    script.write_text(command_script)
    script.chmod(0o755)

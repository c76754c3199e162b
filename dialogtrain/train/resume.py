"""Which checkpoint a run continues from, and whether it may: the checkpoint layout, read without torch.

    RUN/checkpoints/latest               the tag of the newest complete checkpoint (DeepSpeed's format)
    RUN/checkpoints/step-000200/         DeepSpeed's sharded checkpoint (model states, ZeRO shards), plus
        progress.json                    step, epoch, position in the epoch, world size, data fingerprints,
                                         the options training depends on, and the size and sha256 of
                                         every other file of the checkpoint (written last)
        rng-rank00000.safetensors        the python, numpy and torch RNG states of each rank
        hf/                              config, generation config, tokenizer: what `dialogtrain export` needs

A run resumes (`--resume auto|PATH`, or by itself after a torchrun restart) only from a checkpoint whose
files match what progress.json recorded and whose data and options match the run (`--resume-force`
overrides the latter). `--resume auto` falls back to the newest checkpoint that verifies, saying which
and why. The launcher checks all this before starting anything, so this module imports no torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dialogtrain.errors import UserError, first_line
from dialogtrain.loss_facts import PREFERENCE_COMMANDS
from dialogtrain.options import SECTIONS, RunOptions, flag

CHECKPOINTS = "checkpoints"
LATEST = "latest"
PROGRESS = "progress.json"
HF_FILES = "hf"
UNIVERSAL = "universal"
TMP = ".tmp"
TAG = re.compile(r"step-(\d+)")
FORMAT = 2  # 2: progress.json records each file's size and sha256; 1 (read, not verified): it did not
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"

# Options that may differ between a checkpoint and the run resuming from it: where and how the run is
# launched (the whole launch section, the number of processes), how the global batch is split into
# micro-batches and accumulation (the global batch itself must stay), laid out in tensors (packed or
# padded) and whether activations are recomputed, and what is logged (and to which trackers, under which
# run name), evaluated (--keep-overlap: which eval examples count) and kept.
FREE_ON_RESUME = {"micro_batch", "grad_accum", "packing", "gradient_checkpointing", "log_every", "eval_every",
                  "eval_on_start", "save_every", "keep_last", "export_fp32", "report_to", "run_name", "keep_overlap"}


@dataclass(frozen=True)
class Progress:
    """Where a run stands: optimizer steps done, the epoch of the next step, and the steps already done
    in that epoch (its batches are `step_batches(..., epoch)[position:]`)."""

    step: int = 0
    epoch: int = 0
    position: int = 0


@dataclass(frozen=True)
class ResumePoint:
    """A validated checkpoint to continue from. `universal`: it was written by another number of
    processes under ZeRO, so it is loaded through DeepSpeed's universal checkpoint."""

    folder: Path
    progress: Progress
    world_size: int
    universal: bool
    forced: tuple[str, ...] = ()  # what differs, accepted by --resume-force
    skipped: tuple[str, ...] = ()  # newer checkpoints passed over because they are damaged, and why


def restart_count() -> int:
    """How often torchrun restarted this worker (--max-restarts); 0 on the first attempt."""
    return int(os.environ.get(RESTART_ENV, "0") or 0)


def tag_of(step: int) -> str:
    return f"step-{step:06d}"


def step_of(folder: Path) -> int:
    return int(TAG.fullmatch(folder.name).group(1))


# ----------------------------------------------------------------------------------------------------
# the files of a checkpoint, and checking them


def file_record(path: Path) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex} of one file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def manifest_of(folder: Path, files: list[str]) -> dict[str, dict[str, Any]]:
    """{path relative to `folder`: file_record} of the given files (absolute paths inside `folder`)."""
    return {Path(file).relative_to(folder).as_posix(): file_record(Path(file)) for file in sorted(files)}


def damage(folder: Path, progress: dict[str, Any], hashes: bool = True) -> str | None:
    """Why the files of a checkpoint differ from what its progress.json recorded, or None when they match:
    a file missing, of another size, or (with `hashes`) with another sha256. A checkpoint of format 1
    recorded nothing and always matches."""
    recorded = progress.get("files")
    if recorded is None:
        return None
    for name, want in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, {want['size']} were written"
        if hashes and file_record(path)["sha256"] != want["sha256"]:
            return f"{path} is damaged (its sha256 differs from the one recorded when it was written)"
    return None


def verified(folder: Path, hashes: bool = True) -> tuple[dict[str, Any], str | None]:
    """(progress record, why the checkpoint is damaged or None). An unreadable progress.json is damage."""
    try:
        progress = read_progress(folder)
    except UserError as err:
        return {}, str(err)
    return progress, damage(folder, progress, hashes)


# ----------------------------------------------------------------------------------------------------
# finding checkpoints


def is_complete(folder: Path) -> bool:
    return TAG.fullmatch(folder.name) is not None and (folder / PROGRESS).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under RUN/checkpoints, newest first; the one `latest` names goes first."""
    found = sorted((p for p in root.glob("step-*") if is_complete(p)), key=step_of, reverse=True)
    with contextlib.suppress(OSError):
        named = root / (root / LATEST).read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `root/latest` names; if it is missing or incomplete, the newest complete one."""
    found = complete_checkpoints(root)
    return found[0] if found else None


def newest_good_checkpoint(root: Path, hashes: bool = True) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint whose files verify, or None; one line per newer damaged one, saying why)."""
    skipped = []
    for folder in complete_checkpoints(root):
        why = verified(folder, hashes)[1]
        if why is None:
            return folder, skipped
        skipped.append(f"{folder.name}: {why}")
    return None, skipped


def checkpoint_folder(path: str) -> Path:
    """The checkpoint folder `--resume PATH` (or `dialogtrain export PATH`) names: a checkpoint folder, or a
    checkpoints folder or run folder, meaning its latest checkpoint."""
    given = Path(path).expanduser()
    if (given / PROGRESS).is_file():
        return given
    for root in (given, given / CHECKPOINTS):
        found = latest_checkpoint(root) if root.is_dir() else None
        if found:
            return found
    if not given.exists():
        raise UserError(f"{path}: no such checkpoint folder")
    raise UserError(f"{path}: not a dialogtrain checkpoint (no {PROGRESS}), nor a run or checkpoints folder "
                    "holding one")


def verified_checkpoint(path: str, hashes: bool = True) -> tuple[Path, dict[str, Any]]:
    """(folder, progress record) of the checkpoint `path` names (see checkpoint_folder), whose files must
    verify; a damaged one is a UserError naming the bad file and the newest good checkpoint beside it."""
    folder = checkpoint_folder(path)
    progress, why = verified(folder, hashes)
    if why is None:
        return folder, progress
    good, _ = newest_good_checkpoint(folder.parent, hashes)
    other = f"; the newest good checkpoint is {good}" if good else "; no other checkpoint there verifies"
    raise UserError(f"checkpoint {folder}: {why}{other}")


def read_progress(folder: Path) -> dict[str, Any]:
    try:
        progress = json.loads((folder / PROGRESS).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{folder / PROGRESS}: cannot read it ({first_line(err)})") from None
    if progress.get("format") not in (1, FORMAT):
        raise UserError(f"{folder / PROGRESS}: checkpoint format {progress.get('format')!r}, this dialogtrain "
                        f"reads formats 1 and {FORMAT}")
    return progress


# ----------------------------------------------------------------------------------------------------
# may this run continue from it?


def find_resume_point(run_dir: Path, options: RunOptions, fingerprints: dict[str, str],
                      restarted: bool = False, hashes: bool = True) -> ResumePoint | None:
    """The checkpoint this run continues from, or None for a fresh start.

    --resume auto: the newest checkpoint of the run folder whose files verify (none yet: a fresh start).
    --resume PATH: that checkpoint, which must verify. A worker restarted by torchrun resumes from the
    run's newest good checkpoint (else from PATH, else from scratch). `hashes`: compare sha256 too, not
    only sizes. Raises UserError when the data or options differ, unless --resume-force.
    """
    request = options.launch.resume
    folder, skipped = None, []
    if restarted or request == "auto":
        folder, skipped = newest_good_checkpoint(run_dir / CHECKPOINTS, hashes)
        if folder is None and skipped and request == "auto":
            raise UserError(f"--resume auto: no checkpoint in {run_dir / CHECKPOINTS} verifies ("
                            + "; ".join(skipped) + ")")
    if folder is None and request not in (None, "auto"):
        folder, _ = verified_checkpoint(request, hashes)
    if folder is None:
        return None
    saved = read_progress(folder)
    problems = resume_problems(saved, options, fingerprints)
    if problems and not options.launch.resume_force:
        raise UserError(f"cannot resume from {folder}: " + "; ".join(problems)
                        + ". Resume with the checkpoint's data and options, or add --resume-force to continue "
                          "anyway")
    progress = Progress(saved["step"], saved["epoch"], saved["position"])
    universal = saved["world_size"] != options.world_size and options.optim.zero > 0 and saved["zero"] > 0
    return ResumePoint(folder, progress, saved["world_size"], universal, tuple(problems), tuple(skipped))


def resume_problems(saved: dict[str, Any], options: RunOptions, fingerprints: dict[str, str]) -> list[str]:
    """What differs between a checkpoint's progress record and this run, one line each naming the flag."""
    problems = []
    if saved["command"] != options.command:
        problems.append(f"it was written by `dialogtrain {saved['command']}`, this is `dialogtrain {options.command}`")
    for name, value in fingerprints.items():
        if saved["data_fingerprints"].get(name) != value:
            source = getattr(options.data, name)
            problems.append(f"{flag(name)} {source}: not the data the checkpoint was trained on (the files "
                            "changed)" if source else f"{flag(name)} is not given, the checkpoint had one")
    old, new = saved["options"], training_options(options)
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            label = ("the global batch (--micro-batch x --grad-accum x processes)" if name == "global_batch"
                     else flag(name))
            problems.append(f"{label} changed: {old.get(name)!r} -> {new.get(name)!r}")
    return problems


def training_options(options: RunOptions) -> dict[str, Any]:
    """The options a checkpoint's training depends on, by field name: run.json without the launch section
    and FREE_ON_RESUME, plus the global batch."""
    values: dict[str, Any] = {"global_batch": options.global_batch}
    for section in SECTIONS:
        if section == "launch" or (section == "dpo" and options.command not in PREFERENCE_COMMANDS):
            continue
        values.update({name: value for name, value in dataclasses.asdict(getattr(options, section)).items()
                       if name not in FREE_ON_RESUME})
    return values


def run_hash(options: RunOptions) -> str:
    """sha256 of run.json without what may change on resume (the launch section, FREE_ON_RESUME)."""
    return hashlib.sha256(json.dumps(training_options(options), sort_keys=True).encode()).hexdigest()


def data_fingerprints(options: RunOptions) -> dict[str, str]:
    from dialogtrain.data.mixture import sources_fingerprint

    return {name: sources_fingerprint(source) if source else ""
            for name, source in (("data", options.data.data), ("eval_data", options.data.eval_data))}


def launch_resume_problems(options: RunOptions) -> list[str]:
    """For the launcher, before it writes anything: why this --resume would be refused ([] when fine or
    when --resume-force). The files' sizes are checked here, their sha256 by the workers (once)."""
    try:
        find_resume_point(Path(options.launch.output), options, data_fingerprints(options), hashes=False)
    except UserError as err:
        return [f"{flag('resume')} {options.launch.resume}: {err}"]
    return []

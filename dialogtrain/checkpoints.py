"""Checkpoints, resume and failures: what lets a run lose nothing when it stops.

    RUN/checkpoints/latest               the tag of the newest complete checkpoint (DeepSpeed's format)
    RUN/checkpoints/step-000200/         DeepSpeed's sharded checkpoint (model states, ZeRO shards), plus
        progress.json                    step, epoch, position in the epoch, world size, data fingerprints,
                                         the options training depends on (written last)
        rng-rank00000.safetensors        the python, numpy and torch RNG states of each rank
        hf/                              config, generation config, tokenizer: what `dialogtrain export` needs

Every rank writes the checkpoint under `step-000200.tmp`; once all are done (a barrier) rank 0 renames it
and only then replaces `latest`, so a kill at any moment leaves the previous checkpoint as `latest`,
complete and loadable. `--keep-last K` removes older ones after that.

A run resumes (`--resume auto|PATH`, or by itself after a torchrun restart) only from a checkpoint whose
data and options match (`--resume-force` overrides), loads it with `torch.load(weights_only=True)` even
where DeepSpeed 0.19 passes weights_only=False, goes through DeepSpeed's universal checkpoint when the
number of processes changed under ZeRO, and continues exactly: the same next batch (the sampler is a
function of seed and epoch, so the position is the steps done in the epoch) and the same RNG draws.

This module is torch-free at import time: the launcher checks a resume with it before starting anything.

Fault injection for the tests: DIALOGTRAIN_FAULT=KIND:STEP[:RANK][,...], on the first attempt only (a
worker restarted by torchrun runs clean), rank 0 unless RANK is given:
    kill-at-step:S      SIGKILL right after optimizer step S (before its checkpoint)
    kill-during-save:S  SIGKILL after the first file DeepSpeed writes for the checkpoint of step S
    fail-save:S         writing the checkpoint of step S fails as on a full disk
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dialogtrain.errors import UserError
from dialogtrain.options import SECTIONS, RunOptions, flag

if TYPE_CHECKING:  # distributed imports torch; this module must not at import time
    from dialogtrain.distributed import World

CHECKPOINTS = "checkpoints"
LATEST = "latest"
PROGRESS = "progress.json"
HF_FILES = "hf"
UNIVERSAL = "universal"
TMP = ".tmp"
TAG = re.compile(r"step-(\d+)")
FORMAT = 1
FAULT_ENV = "DIALOGTRAIN_FAULT"
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"

# Options that may differ between a checkpoint and the run resuming from it: where and how the run is
# launched (the whole launch section, the number of processes), how the global batch is split into
# micro-batches and accumulation (the global batch itself must stay), laid out in tensors (packed or
# padded) and whether activations are recomputed, and what is logged, evaluated and kept.
FREE_ON_RESUME = {"micro_batch", "grad_accum", "packing", "gradient_checkpointing", "log_every", "eval_every",
                  "save_every", "keep_last"}
# ds_to_universal needs this in the model states; Megatron-style models add their own patterns.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


class TrainingError(UserError):
    """Training cannot go on (NaN/inf loss, a checkpoint that cannot be written): exit 3, nothing that
    was saved before is touched."""

    exit_code = 3


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


# ----------------------------------------------------------------------------------------------------
# the checkpoints of one run


class Checkpoints:
    """The checkpoint side of one run, the same calls from both loops:

        checkpoints = Checkpoints.open(run_dir, options, world)  # before data: a refused resume stops here
        checkpoints.check_space(model)                          # before training: room for a checkpoint
        engine = build_engine(model, checkpoints.ds_config(ds_config), ...)
        progress = checkpoints.restore(engine)                  # Progress() on a fresh start
        ... per step: checkpoints.check_loss(...); checkpoints.step_done(engine, tokenizer, progress)
    """

    def __init__(self, run_dir: Path, options: RunOptions, world: World, fingerprints: dict[str, str],
                 resume: ResumePoint | None):
        self.run_dir = run_dir
        self.root = run_dir / CHECKPOINTS
        self.options = options
        self.world = world
        self.fingerprints = fingerprints
        self.resume = resume

    @classmethod
    def open(cls, run_dir: Path, options: RunOptions, world: World) -> Checkpoints:
        """Check that the run folder takes checkpoints and find (and validate) the checkpoint to resume from.

        The data files are hashed (their fingerprints go into every checkpoint) only by a run that saves
        checkpoints or resumes.
        """
        check_writable(run_dir, options, world.rank)
        restarted = restart_count() > 0
        needed = options.schedule.save_every or options.launch.resume or restarted
        fingerprints = data_fingerprints(options) if needed else {}
        resume = find_resume_point(run_dir, options, fingerprints, restarted=restarted)
        if resume:
            for line in resume.forced:
                world.print(f"--resume-force: resuming although {line}")
            how = (f", through a universal checkpoint (written by {resume.world_size} processes, resumed by "
                   f"{options.world_size})" if resume.universal else "")
            world.print(f"resume: {resume.folder} (step {resume.progress.step}, epoch {resume.progress.epoch}, "
                        f"{resume.progress.position} steps into it){how}")
        return cls(run_dir, options, world, fingerprints, resume)

    def check_space(self, model) -> None:
        """Refuse to start when the run folder cannot hold a checkpoint and the final export.

        Bytes per parameter: the weights (4 in fp32, 2 in bf16/fp16) and Adam's two fp32 moments (8), plus
        an fp32 master copy (4) under ZeRO or mixed precision; the final export holds the weights only.
        """
        params = sum(p.numel() for p in model.parameters())
        weight_bytes = 4 if self.options.optim.precision == "fp32" else 2
        master = 4 if self.options.optim.zero > 0 or self.options.optim.precision != "fp32" else 0
        per_param = weight_bytes + 8 + master if self.options.schedule.save_every else 0
        need = params * (per_param + weight_bytes)
        free = free_bytes(self.run_dir)
        if free < need:
            what = (f"a checkpoint ({params:,} parameters x {per_param} bytes) and the final export "
                    f"({weight_bytes} bytes each)" if per_param else
                    f"the final export ({params:,} parameters x {weight_bytes} bytes)")
            raise UserError(f"--output {self.run_dir}: {gigabytes(free)} free, but {what} need about "
                            f"{gigabytes(need)}; free some space or choose another --output")

    def ds_config(self, config: dict) -> dict:
        """The run's DeepSpeed config, set to load a universal checkpoint when the resume needs one."""
        if not (self.resume and self.resume.universal):
            return config
        return {**config, "checkpoint": {**config.get("checkpoint", {}), "load_universal": True}}

    def restore(self, engine) -> Progress:
        """Load the resume point into `engine` (weights, optimizer, scheduler, RNG); Progress() for a fresh
        start. RUN/metrics.jsonl keeps the records of the steps before the resume point only."""
        progress = self.resume.progress if self.resume else Progress()
        if self.resume:
            load_deepspeed_checkpoint(engine, self.resume, self.world)
            replay_cpu_adam_steps(engine)
            restore_rng_state(self.resume.folder, self.world.rank)
        if self.world.is_main:
            trim_metrics(self.run_dir / "metrics.jsonl", progress.step)
        return progress

    def check_loss(self, engine, loss: float, step: int) -> dict[str, int]:
        """Extra metrics of the step ({} or, under fp16, skipped_steps); TrainingError when the run must stop.

        Under fp16 dynamic loss scaling an overflow is routine: DeepSpeed skips that update and lowers the
        scale, so a non-finite loss of a skipped step is counted, not fatal. Anywhere else (fp32, bf16, or
        an fp16 step DeepSpeed applied) a NaN/inf loss stops the run before anything of it is saved.
        """
        fp16 = engine.fp16_enabled()
        if math.isfinite(loss) or (fp16 and not engine.was_step_applied()):
            return {"skipped_steps": engine.skipped_steps} if fp16 else {}
        raise TrainingError(f"loss is {loss} at step {step}; stopping, nothing of this step is saved. "
                            f"{self.last_good()}")

    def report_skipped_steps(self, engine, total_steps: int) -> None:
        """Under fp16, one line on the updates DeepSpeed skipped (gradient overflow)."""
        if engine.fp16_enabled() and engine.skipped_steps:
            self.world.print(f"fp16: DeepSpeed skipped {engine.skipped_steps} of {total_steps} optimizer steps "
                             "(gradient overflow; it lowered the loss scale each time)")

    def last_good(self) -> str:
        """What a stopped run leaves to continue from, for its error message."""
        folder = latest_checkpoint(self.root)
        if folder is None:
            return "No checkpoint was written yet (--save-every 0, or before the first one)."
        return (f"The last good checkpoint is {folder} (step {step_of(folder)}); to continue from it with a "
                f"lower --lr or another --precision, add --resume {folder} --resume-force.")

    def step_done(self, engine, tokenizer, progress: Progress) -> None:
        """After each optimizer step: checkpoint every --save-every steps."""
        if injected_fault("kill-at-step", progress.step, self.world.rank):
            os.kill(os.getpid(), signal.SIGKILL)
        every = self.options.schedule.save_every
        if every and progress.step % every == 0:
            self.save(engine, tokenizer, progress)

    def save(self, engine, tokenizer, progress: Progress) -> Path:
        """RUN/checkpoints/step-NNNNNN, atomically: written under .tmp by every rank, renamed by rank 0 after
        a barrier, `latest` replaced last, then --keep-last applied. Every rank must call it."""
        tag = tag_of(progress.step)
        tmp = self.root / (tag + TMP)
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.world.barrier()
        written: list[str] = []

        def after_file(path: str) -> None:
            written.append(path)
            if injected_fault("kill-during-save", progress.step, self.world.rank):
                os.kill(os.getpid(), signal.SIGKILL)
            if injected_fault("fail-save", progress.step, self.world.rank):
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {FAULT_ENV})", path)

        try:
            with reporting_files(engine, after_file):
                engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=UNIVERSAL_INFO, save_latest=False)
            written.append(save_rng_state(tmp, self.world.rank))
            if self.world.is_main:
                written += save_export_files(engine.module, tokenizer, tmp / HF_FILES)
                written.append(write_json(tmp / PROGRESS, self.progress_record(engine, progress)))
            sync_files(written)
        except (OSError, RuntimeError) as err:
            if self.world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(f"could not write the checkpoint of step {progress.step} in {self.root} "
                                f"({first_line(err)}); stopping. {self.last_good()}") from None
        self.world.barrier()
        if self.world.is_main:
            from dialogtrain.export import replace_dir

            replace_dir(tmp, self.root / tag)
            write_latest(self.root, tag)
            remove_old_checkpoints(self.root, self.options.schedule.keep_last)
        self.world.barrier()
        self.world.print(f"checkpoint: {self.root / tag}")
        return self.root / tag

    def progress_record(self, engine, progress: Progress) -> dict[str, Any]:
        import deepspeed

        dtype = next(engine.module.parameters()).dtype
        return {"format": FORMAT, **dataclasses.asdict(progress), "command": self.options.command,
                "world_size": self.world.size, "zero": self.options.optim.zero,
                "dtype": str(dtype).removeprefix("torch."), "skipped_steps": engine.skipped_steps,
                "data_fingerprints": self.fingerprints, "run_hash": run_hash(self.options),
                "options": training_options(self.options), "deepspeed": deepspeed.__version__}


def restart_count() -> int:
    return int(os.environ.get(RESTART_ENV, "0") or 0)


def tag_of(step: int) -> str:
    return f"step-{step:06d}"


def step_of(folder: Path) -> int:
    return int(TAG.fullmatch(folder.name).group(1))


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_writable(run_dir: Path, options: RunOptions, rank: int) -> None:
    """Create RUN (and RUN/checkpoints when the run saves any) and write a probe file in it."""
    folders = [run_dir, run_dir / CHECKPOINTS] if options.schedule.save_every else [run_dir]
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{rank}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            raise UserError(f"--output {run_dir}: cannot write in {folder} ({err.strerror or err})") from None


# ----------------------------------------------------------------------------------------------------
# finding and checking the checkpoint to resume from


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `root/latest` names; if it is missing or incomplete, the newest complete one."""
    latest = root / LATEST
    with contextlib.suppress(OSError):
        named = root / latest.read_text().strip()
        if is_complete(named):
            return named
    complete = sorted((p for p in root.glob("step-*") if is_complete(p)), key=step_of)
    return complete[-1] if complete else None


def is_complete(folder: Path) -> bool:
    return TAG.fullmatch(folder.name) is not None and (folder / PROGRESS).is_file()


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


def read_progress(folder: Path) -> dict[str, Any]:
    try:
        progress = json.loads((folder / PROGRESS).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{folder / PROGRESS}: cannot read it ({first_line(err)})") from None
    if progress.get("format") != FORMAT:
        raise UserError(f"{folder / PROGRESS}: checkpoint format {progress.get('format')!r}, this dialogtrain "
                        f"reads format {FORMAT}")
    return progress


def find_resume_point(run_dir: Path, options: RunOptions, fingerprints: dict[str, str],
                      restarted: bool = False) -> ResumePoint | None:
    """The checkpoint this run continues from, or None for a fresh start.

    --resume auto: the latest checkpoint of the run folder (none yet: a fresh start). --resume PATH: that
    checkpoint. A worker restarted by torchrun resumes from the run's latest checkpoint (else from PATH,
    else from scratch). Raises UserError when the data or options differ, unless --resume-force.
    """
    request = options.launch.resume
    folder = latest_checkpoint(run_dir / CHECKPOINTS) if restarted or request == "auto" else None
    if folder is None and request not in (None, "auto"):
        folder = checkpoint_folder(request)
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
    return ResumePoint(folder, progress, saved["world_size"], universal, tuple(problems))


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
        if section == "launch" or (section == "dpo" and options.command != "dpo"):
            continue
        values.update({name: value for name, value in dataclasses.asdict(getattr(options, section)).items()
                       if name not in FREE_ON_RESUME})
    return values


def run_hash(options: RunOptions) -> str:
    """sha256 of run.json without what may change on resume (the launch section, FREE_ON_RESUME)."""
    return hashlib.sha256(json.dumps(training_options(options), sort_keys=True).encode()).hexdigest()


def data_fingerprints(options: RunOptions) -> dict[str, str]:
    from dialogtrain.data import data_fingerprint

    return {name: data_fingerprint(source) if source else ""
            for name, source in (("data", options.data.data), ("eval_data", options.data.eval_data))}


def launch_resume_problems(options: RunOptions) -> list[str]:
    """For the launcher, before it writes anything: why this --resume would be refused ([] when fine or
    when --resume-force). Torch-free."""
    try:
        find_resume_point(Path(options.launch.output), options, data_fingerprints(options))
    except UserError as err:
        return [f"{flag('resume')} {options.launch.resume}: {err}"]
    return []


# ----------------------------------------------------------------------------------------------------
# writing


@contextlib.contextmanager
def reporting_files(engine, after_file: Callable[[str], None]) -> Iterator[None]:
    """Call `after_file(path)` after each file DeepSpeed's checkpoint engine writes (fsync, fault injection)."""
    writer = engine.checkpoint_engine

    def save(state_dict, path):
        type(writer).save(writer, state_dict, path)
        after_file(str(path))

    writer.save = save
    try:
        yield
    finally:
        del writer.save


def save_rng_state(folder: Path, rank: int) -> str:
    """folder/rng-rankNNNNN.safetensors: the python, numpy, torch (and CUDA) RNG states of this rank."""
    import random

    import numpy as np
    import torch
    from safetensors.torch import save_file

    version, python_keys, gauss = random.getstate()
    kind, numpy_keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"python": torch.tensor(python_keys, dtype=torch.int64),
               "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    scalars = {"python_version": version, "python_gauss": gauss, "numpy_kind": kind, "numpy_pos": pos,
               "numpy_has_gauss": has_gauss, "numpy_cached_gaussian": cached}
    path = folder / f"rng-rank{rank:05d}.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"scalars": json.dumps(scalars)})
    return str(path)


def restore_rng_state(folder: Path, rank: int) -> None:
    """Set this rank's RNG states from the checkpoint; a rank the checkpoint did not have keeps its seed."""
    import random

    import numpy as np
    import torch
    from safetensors import safe_open

    path = folder / f"rng-rank{rank:05d}.safetensors"
    if not path.exists():
        return
    with safe_open(str(path), framework="pt") as f:
        scalars = json.loads(f.metadata()["scalars"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    random.setstate((scalars["python_version"], tuple(tensors["python"].tolist()), scalars["python_gauss"]))
    np.random.set_state((scalars["numpy_kind"], tensors["numpy"].numpy().astype(np.uint32), scalars["numpy_pos"],
                         scalars["numpy_has_gauss"], scalars["numpy_cached_gaussian"]))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def save_export_files(model, tokenizer, folder: Path) -> list[str]:
    """What `dialogtrain export` needs beside the weights: config, generation config, tokenizer."""
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return [str(p) for p in folder.iterdir()]


def write_json(path: Path, value: dict) -> str:
    path.write_text(json.dumps(value, indent=2) + "\n")
    return str(path)


def write_latest(root: Path, tag: str) -> None:
    tmp = root / (LATEST + TMP)
    tmp.write_text(tag)
    sync_files([str(tmp)])
    os.replace(tmp, root / LATEST)
    sync_files([str(root)])


def sync_files(paths: list[str]) -> None:
    """fsync, so that a checkpoint renamed into place is on disk, not only in the page cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_old_checkpoints(root: Path, keep_last: int) -> None:
    """Remove leftovers of interrupted saves and, with keep_last K > 0, all but the K newest checkpoints
    (never the one `latest` names)."""
    latest = latest_checkpoint(root)
    for leftover in root.glob(f"step-*{TMP}"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last:
        complete = sorted((p for p in root.glob("step-*") if is_complete(p)), key=step_of)
        for old in complete[:-keep_last]:
            if old != latest:
                shutil.rmtree(old, ignore_errors=True)


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics records of steps before `step` (and the training record of `step` itself), so a
    resumed run logs every later step exactly once. A line cut short by a kill is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) < step or (record.get("step") == step and "loss" in record):
            kept.append(line + "\n")
    tmp = path.with_name(path.name + TMP)
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# loading, safely


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Every torch.load inside unpickles tensors and plain data only, plus the few DeepSpeed classes its
    checkpoints hold. DeepSpeed 0.19.8 calls torch.load(weights_only=False) everywhere (its checkpoint
    engine, ZeRO-3 and universal loading, zero_to_fp32), so TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides it."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_deepspeed_checkpoint(engine, resume: ResumePoint, world: World) -> None:
    """Weights, optimizer and scheduler state into `engine`, safely; UserError when the files refuse."""
    import pickle

    try:
        with safe_torch_load():
            if resume.universal:
                load_dir, tag = resume.folder, universal_checkpoint(resume.folder, world).name
            else:
                load_dir, tag = resume.folder.parent, resume.folder.name
            loaded, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{resume.folder}: refusing to load it: a file holds Python objects that are neither "
                        f"tensors nor DeepSpeed's own checkpoint state ({first_line(err)})") from None
    except (OSError, RuntimeError, KeyError, ValueError, AssertionError) as err:
        raise UserError(f"{resume.folder}: cannot load this checkpoint ({type(err).__name__}: "
                        f"{first_line(err)})") from None
    if loaded is None:
        raise UserError(f"{resume.folder}: DeepSpeed found no checkpoint files in it")


def replay_cpu_adam_steps(engine) -> None:
    """Make DeepSpeed's CPU Adam kernels continue bit-exactly after a resume.

    They keep beta1^t and beta2^t in C++ state, multiplied by beta once per step; a process that starts
    at step t + 1 computes pow(beta, t + 1) instead, which can differ in the last bit and then moves every
    later update by ~1e-7. Replaying steps 1..t on a one-element dummy tensor rebuilds the same products.
    (FusedAdam on CPU and DeepSpeedCPUAdam, i.e. optimizer offload; the CUDA kernels compute the powers
    from t at every step and need nothing.)
    """
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    adam = engine.basic_optimizer
    cpu_fused = isinstance(adam, FusedAdam) and get_accelerator().device_name() == "cpu"
    if not (cpu_fused or isinstance(adam, DeepSpeedCPUAdam)):
        return
    steps = max((int(state["step"]) for state in adam.state.values() if "step" in state), default=0)
    group = adam.param_groups[0]
    (beta1, beta2), lr, eps, decay = group["betas"], group["lr"], group["eps"], group["weight_decay"]
    grad, param, exp_avg, exp_avg_sq = (torch.zeros(1) for _ in range(4))
    for step in range(1, steps + 1):
        if cpu_fused:
            adam.multi_tensor_adam(2048 * 32, adam._dummy_overflow_buf, [[grad], [param], [exp_avg], [exp_avg_sq]],
                                   lr, beta1, beta2, eps, step, adam.adam_w_mode, int(group["bias_correction"]), decay)
        else:
            adam.ds_opt_adam.adam_update(adam.opt_id, step, lr, beta1, beta2, eps, decay, group["bias_correction"],
                                         param, grad, exp_avg, exp_avg_sq)


def universal_checkpoint(folder: Path, world: World) -> Path:
    """folder/universal: DeepSpeed's universal checkpoint of `folder` (per-parameter fp32 weights and Adam
    moments, loadable by any number of processes), converted once by rank 0 with ds_to_universal."""
    out = folder / UNIVERSAL
    if world.is_main and not out.is_dir():
        import argparse

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = folder / (UNIVERSAL + TMP)
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(folder), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal(args)
        tmp.rename(out)
        (folder / "latest_universal").write_text(UNIVERSAL)
    world.barrier()
    return out


# ----------------------------------------------------------------------------------------------------
# export: a checkpoint -> the Hugging Face folder RUN/final would be


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """Write the Hugging Face folder of a saved checkpoint (any ZeRO stage) to `out_dir`, offline: the same
    folder RUN/final holds when training ends at that step (weights in the training precision)."""
    import torch

    from dialogtrain.export import export_hf_checkpoint

    folder = checkpoint_folder(str(checkpoint))
    progress = read_progress(folder)
    with safe_torch_load():
        state_dict = consolidated_state_dict(folder, progress["zero"])
    dtype = getattr(torch, progress["dtype"])
    cast: dict[int, torch.Tensor] = {}  # by tensor, so tied parameters (one tensor, two names) stay one
    for tensor in state_dict.values():
        if id(tensor) not in cast:
            cast[id(tensor)] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    state_dict = {name: cast[id(tensor)] for name, tensor in state_dict.items()}
    model, tokenizer = model_skeleton(folder / HF_FILES, dtype, trust_remote_code)
    return export_hf_checkpoint(model, state_dict, tokenizer, out_dir)


def consolidated_state_dict(folder: Path, zero: int) -> dict:
    """The full state dict of a checkpoint: ZeRO-0 holds it whole in its model states; ZeRO 1-3 are
    consolidated from the fp32 master weights of every shard by DeepSpeed's zero_to_fp32, which also
    restores tied parameters (GPT-2's LM head is its embedding) as one tensor."""
    import torch

    if zero == 0:
        states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return states["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


def model_skeleton(hf_files: Path, dtype, trust_remote_code: bool):
    """(model on the meta device in `dtype`, tokenizer) from a checkpoint's hf/ folder: the config,
    generation config and tokenizer export_hf_checkpoint writes beside the weights (save_pretrained records
    the model's dtype); no weights are allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(hf_files, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code).to(dtype)
        model.generation_config = GenerationConfig.from_pretrained(hf_files)
        tokenizer = AutoTokenizer.from_pretrained(hf_files, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        hint = " (it needs --trust-remote-code)" if "trust_remote_code" in str(err) else ""
        raise UserError(f"{hf_files}: cannot rebuild the model from its config and tokenizer{hint}: "
                        f"{first_line(err)}") from None
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------
# fault injection (tests)


def injected_fault(kind: str, step: int, rank: int) -> bool:
    """Whether DIALOGTRAIN_FAULT asks for `kind` at `step` on `rank`; never in a restarted worker."""
    if restart_count() > 0:
        return False
    for entry in os.environ.get(FAULT_ENV, "").split(","):
        parts = entry.strip().split(":")
        if len(parts) in (2, 3) and parts[0] == kind and parts[1] == str(step) \
                and (parts[2] if len(parts) == 3 else "0") == str(rank):
            return True
    return False

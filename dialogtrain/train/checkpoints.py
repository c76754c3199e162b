"""Saving and restoring a run's DeepSpeed checkpoints: atomically, with a manifest, loaded safely.

The layout and the choice of checkpoint to resume from are train.resume's (torch-free); this is the
torch side. Every rank writes the checkpoint under `step-000200.tmp` and records the size and sha256 of
each file it wrote; rank 0 gathers them into progress.json, written last, then (after a barrier)
renames the folder and only then replaces `latest`, so a kill at any moment leaves the previous
checkpoint as `latest`, complete and loadable. `--keep-last K` removes older ones after that.

A resume loads with `torch.load(weights_only=True)` even where DeepSpeed 0.19 passes
weights_only=False, goes through DeepSpeed's universal checkpoint when the number of processes
changed under ZeRO, and continues exactly: the same next batch (the sampler is a function of seed and
epoch, so the position is the steps done in the epoch) and the same RNG draws.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from dialogtrain.errors import TrainingError, UserError, first_line
from dialogtrain.options import RunOptions
from dialogtrain.train.faults import FILE_WRITTEN, STEP_DONE, fault_point
from dialogtrain.train.lora import is_peft_model, save_adapter_config
from dialogtrain.train.metrics import trim_metrics
from dialogtrain.train.resume import (
    CHECKPOINTS,
    FORMAT,
    HF_FILES,
    LATEST,
    PROGRESS,
    TMP,
    UNIVERSAL,
    Progress,
    ResumePoint,
    data_fingerprints,
    find_resume_point,
    is_complete,
    latest_checkpoint,
    manifest_of,
    restart_count,
    run_hash,
    step_of,
    tag_of,
    training_options,
)
from dialogtrain.train.rng import restore_rng_state, save_rng_state

if TYPE_CHECKING:
    from dialogtrain.train.distributed import World

# ds_to_universal needs this in the model states; Megatron-style models add their own patterns.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


class Checkpoints:
    """The checkpoint side of one run, the same calls from both loops (train.loop):

        checkpoints = Checkpoints.open(run_dir, options, world)  # before data: a refused resume stops here
        checkpoints.check_space(model)                          # before training: room for a checkpoint
        engine = build_engine(model, checkpoints.ds_config(ds_config), ...)
        progress = checkpoints.restore(engine)                  # Progress() on a fresh start
        ... after each step: checkpoints.save_if_due(engine, tokenizer, progress)
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
        checkpoints or resumes. Rank 0 alone reads the checkpoint's files to verify them, once, and tells
        the others which checkpoint it is.
        """
        check_writable(run_dir, options, world.rank)
        restarted = restart_count() > 0
        needed = options.schedule.save_every or options.launch.resume or restarted
        fingerprints = data_fingerprints(options) if needed else {}
        resume = world.from_main(lambda: find_resume_point(run_dir, options, fingerprints, restarted=restarted)) \
            if options.launch.resume or restarted else None
        if resume:
            for line in resume.skipped:
                world.print(f"resume: passing over {line}")
            for line in resume.forced:
                world.print(f"--resume-force: resuming although {line}")
            how = (f", through a universal checkpoint (written by {resume.world_size} processes, resumed by "
                   f"{options.world_size})" if resume.universal else "")
            world.print(f"resume: {resume.folder} (step {resume.progress.step}, epoch {resume.progress.epoch}, "
                        f"{resume.progress.position} steps into it){how}")
        return cls(run_dir, options, world, fingerprints, resume)

    def check_space(self, model) -> None:
        """Refuse to start when the run folder cannot hold a checkpoint and the final export.

        Bytes per trained parameter of a checkpoint (LoRA: the adapters only): the weights (4; 2 in
        pure-bf16) and Adam's two fp32 moments (8), plus an fp32 master copy (4) under ZeRO 1-2 or pure bf16;
        the final export holds every weight once, in the export dtype (2 for bf16/fp16 runs, else 4).
        """
        optim = self.options.optim
        params = sum(full_size(p) for p in model.parameters())
        trained = sum(full_size(p) for p in model.parameters() if p.requires_grad)  # LoRA: the adapters only
        weight_bytes = 2 if optim.precision == "pure-bf16" else 4
        master = 4 if optim.zero in (1, 2) or optim.precision == "pure-bf16" else 0
        per_param = weight_bytes + 8 + master if self.options.schedule.save_every else 0
        export_bytes = 4 if optim.export_dtype == "float32" else 2
        need = trained * per_param + params * export_bytes
        free = free_bytes(self.run_dir)
        if free < need:
            what = (f"a checkpoint ({trained:,} parameters x {per_param} bytes) and the final export "
                    f"({export_bytes} bytes each)" if per_param else
                    f"the final export ({params:,} parameters x {export_bytes} bytes)")
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

    def last_good(self) -> str:
        """What a stopped run leaves to continue from, for its error message."""
        folder = latest_checkpoint(self.root)
        if folder is None:
            return "No checkpoint was written yet (--save-every 0, or before the first one)."
        return (f"The last good checkpoint is {folder} (step {step_of(folder)}); to continue from it with a "
                f"lower --lr or another --precision, add --resume {folder} --resume-force.")

    def save_if_due(self, engine, tokenizer, progress: Progress) -> None:
        """After each optimizer step: a checkpoint every --save-every steps."""
        fault_point(STEP_DONE, progress.step, self.world.rank)
        every = self.options.schedule.save_every
        if every and progress.step % every == 0:
            self.save(engine, tokenizer, progress)

    def save(self, engine, tokenizer, progress: Progress) -> Path:
        """RUN/checkpoints/step-NNNNNN, atomically: written under .tmp by every rank, each file's size and
        sha256 gathered into progress.json by rank 0, renamed by rank 0 after a barrier, `latest` replaced
        last, then --keep-last applied. Every rank must call it."""
        tag = tag_of(progress.step)
        tmp = self.root / (tag + TMP)
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.world.barrier()
        written: list[str] = []

        def after_file(path: str) -> None:
            written.append(path)
            fault_point(FILE_WRITTEN, progress.step, self.world.rank, path)

        try:
            with reporting_files(engine, after_file):
                # LoRA: the trainable weights only; the frozen base is --model's, loaded again on resume
                engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=UNIVERSAL_INFO, save_latest=False,
                                       exclude_frozen_parameters=self.options.lora.enabled)
            written.append(save_rng_state(tmp, self.world.rank))
            if self.world.is_main:
                written += save_export_files(engine.module, tokenizer, tmp / HF_FILES)
            sync_files(written)
            mine = manifest_of(tmp, written)  # hashed by the rank that wrote them, while in the page cache
        except (OSError, RuntimeError) as err:
            self.failed(tmp, progress, err)
        manifests = self.world.gather(mine)
        if self.world.is_main:
            files = {name: record for manifest in manifests for name, record in manifest.items()}
            try:
                sync_files([write_json(tmp / PROGRESS, self.progress_record(engine, progress, files))])
            except OSError as err:
                self.failed(tmp, progress, err)
        self.world.barrier()
        if self.world.is_main:
            from dialogtrain.export.hf import replace_dir

            replace_dir(tmp, self.root / tag)
            write_latest(self.root, tag)
            remove_old_checkpoints(self.root, self.options.schedule.keep_last)
        self.world.barrier()
        self.world.print(f"checkpoint: {self.root / tag}")
        return self.root / tag

    def failed(self, tmp: Path, progress: Progress, err: BaseException) -> NoReturn:
        """A save that cannot complete: its folder removed, TrainingError (exit 3) naming the last good one."""
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"could not write the checkpoint of step {progress.step} in {self.root} "
                            f"({first_line(err)}); stopping. {self.last_good()}") from None

    def progress_record(self, engine, progress: Progress, files: dict[str, dict]) -> dict[str, Any]:
        import deepspeed

        return {"format": FORMAT, **dataclasses.asdict(progress), "command": self.options.command,
                "world_size": self.world.size, "zero": self.options.optim.zero,
                "dtype": self.options.optim.export_dtype, "skipped_steps": engine.skipped_steps,
                "data_fingerprints": self.fingerprints, "run_hash": run_hash(self.options),
                "options": training_options(self.options), "deepspeed": deepspeed.__version__, "files": files}


def full_size(parameter) -> int:
    """A parameter's element count, also when ZeRO-3 partitioned it as it loaded (its `ds_numel`)."""
    return getattr(parameter, "ds_numel", parameter.numel())


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


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


def save_export_files(model, tokenizer, folder: Path) -> list[str]:
    """What `dialogtrain export` needs beside the weights: config, generation config, tokenizer (and a LoRA
    run's adapter_config.json, in adapter/)."""
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    written = save_adapter_config(model, folder)
    return [str(p) for p in folder.iterdir() if p.is_file()] + written


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
            # LoRA: the checkpoint lacks the frozen base weights, which the engine already holds
            loaded, _ = engine.load_checkpoint(str(load_dir), tag=tag,
                                               load_module_strict=not is_peft_model(engine.module))
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

"""The training skeleton both methods share: set-up, the step loop with logging, evaluation and
checkpoints, the final save. A method (dialogtrain.sft, dialogtrain.dpo) brings its algorithm as a
`Recipe`: its data, its step, its evaluation.

    options -> checkpoints (refuse a bad --resume first) -> seed -> tokenizer -> data (a bad row stops
    the run before a large model loads) -> model -> plan -> recipe.setup -> engine -> restore
    -> per optimizer step: recipe.train_step, NaN check, log, evaluate every --eval-every steps and at
       the end (once), checkpoint every --save-every steps -> RUN/final
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dialogtrain.data.collate import Collate, choose_collate
from dialogtrain.data.sampling import step_batches
from dialogtrain.errors import TrainingError, UserError, exit_on_user_error
from dialogtrain.export.hf import export_hf_checkpoint, gather_state_dict
from dialogtrain.options import RunOptions
from dialogtrain.train.checkpoints import Checkpoints
from dialogtrain.train.distributed import World, distributed_world
from dialogtrain.train.engine import build_engine, current_lr, read_ds_config
from dialogtrain.train.metrics import open_metrics
from dialogtrain.train.mfu import mfu, peak_flops, train_flops_per_token
from dialogtrain.train.model import load_model, load_tokenizer, recompute_activations
from dialogtrain.train.resume import Progress
from dialogtrain.train.rng import seed_everything


@dataclass(frozen=True)
class Run:
    """What a recipe's set-up, step and evaluation read: the resolved run, its data, how batches are built.
    `model` is the policy as loaded, before DeepSpeed wraps it (the DPO reference starts as its copy)."""

    options: RunOptions
    world: World
    run_dir: Path
    tokenizer: Any
    model: torch.nn.Module
    ds_config: dict
    train_set: list[dict]
    eval_set: list[dict]
    lengths: list[int]  # of each training example, for grouping micro-batches by length
    collate: Collate


class Recipe(Protocol):
    """A training method: the module-level names of dialogtrain/sft.py and dialogtrain/dpo.py."""

    UNIT: str  # what one example is called in messages: "examples", "pairs"
    PROGRESS: tuple[str, ...]  # the step metrics shown in the progress bar

    def load_examples(self, options: RunOptions, tokenizer, world: World) -> tuple[list[dict], list[dict]]:
        """(train set, eval set), loaded, validated and encoded; counts printed once."""

    def example_length(self, example: dict) -> int:
        """Tokens of an example (micro-batches group examples of similar length)."""

    def collate(self, examples: list[dict], pad_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
        """A micro-batch's examples -> its tensors (data.collate)."""

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Changes to the model before DeepSpeed wraps it."""

    def setup(self, run: Run) -> Any:
        """What the step needs besides the engine, built before the engine exists (ZeRO-3 partitions the
        policy when it is built): the DPO reference. Passed to train_step and evaluate as `state`."""

    def describe(self, options: RunOptions) -> str:
        """The method's part of the start-up plan line."""

    def train_step(self, engine, run: Run, state: Any, indices: list[int]) -> dict[str, float]:
        """One optimizer step over the global batch `indices` (example indices, the same on every rank):
        its metrics (loss, grad_norm, input_tokens, target_tokens and the method's own), all ranks summed."""

    def evaluate(self, engine, run: Run, state: Any) -> dict[str, float]:
        """`eval_` metrics over the whole eval set, all ranks together."""

    def eval_summary(self, metrics: dict[str, float]) -> str:
        """The line printed after the final evaluation."""


def plan_steps(options: RunOptions, num_examples: int, unit: str) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps). Refuses data smaller than one global batch."""
    steps_per_epoch = num_examples // options.global_batch
    if steps_per_epoch == 0:
        raise UserError(f"--data has {num_examples} {unit}, fewer than one global batch of "
                        f"{options.global_batch} (--micro-batch x --grad-accum x processes)")
    return steps_per_epoch, options.schedule.max_steps or steps_per_epoch * options.schedule.epochs


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def check_loss(engine, loss: float, step: int, checkpoints: Checkpoints) -> dict[str, int]:
    """Extra metrics of the step ({} or, under fp16, skipped_steps); TrainingError when the run must stop.

    Under fp16 dynamic loss scaling an overflow is routine: DeepSpeed skips that update and lowers the
    scale, so a non-finite loss of a skipped step is counted, not fatal. Anywhere else (fp32, bf16, or
    an fp16 step DeepSpeed applied) a NaN/inf loss stops the run before anything of it is saved.
    """
    fp16 = engine.fp16_enabled()
    if math.isfinite(loss) or (fp16 and not engine.was_step_applied()):
        return {"skipped_steps": engine.skipped_steps} if fp16 else {}
    raise TrainingError(f"loss is {loss} at step {step}; stopping, nothing of this step is saved. "
                        f"{checkpoints.last_good()}")


def report_skipped_steps(engine, total_steps: int, world: World) -> None:
    """Under fp16, one line on the updates DeepSpeed skipped (gradient overflow)."""
    if engine.fp16_enabled() and engine.skipped_steps:
        world.print(f"fp16: DeepSpeed skipped {engine.skipped_steps} of {total_steps} optimizer steps "
                    "(gradient overflow; it lowered the loss scale each time)")


def evaluation_due(step: int, total_steps: int, eval_every: int) -> bool:
    """Evaluate every --eval-every steps and after the last step, never twice for one step."""
    return step == total_steps or (eval_every > 0 and step % eval_every == 0)


def save_final(engine, tokenizer, run_dir: Path, world: World) -> Path:
    """RUN/final: the consolidated Hugging Face folder, written by rank 0 after every rank gathered."""
    state_dict = gather_state_dict(engine)
    final = run_dir / "final"
    if world.is_main:
        export_hf_checkpoint(engine.module, state_dict, tokenizer, final)
    world.barrier()
    return final


def train(run_json: Path, world: World, recipe: Recipe):
    """The whole run of `recipe`. Returns the engine (tests compare its model with the export)."""
    options = RunOptions.load(run_json)
    run_dir = run_json.parent
    checkpoints = Checkpoints.open(run_dir, options, world)  # an unwritable folder or refused --resume stops here
    seed_everything(options.schedule.seed)
    # The data first: a bad row stops the run in seconds, before a large model loads.
    tokenizer = load_tokenizer(options.model.model, options.model.trust_remote_code, options.model.chat_template)
    train_set, eval_set = recipe.load_examples(options, tokenizer, world)
    model = load_model(options.model.model, tokenizer, options.model.trust_remote_code)
    checkpoints.check_space(model)
    recipe.prepare_model(model)
    collate = choose_collate(recipe.collate, options.data.packing, model, tokenizer.pad_token_id, world.print)
    if options.optim.gradient_checkpointing:
        recompute_activations(model)
    lengths = [recipe.example_length(e) for e in train_set]
    steps_per_epoch, total_steps = plan_steps(options, len(train_set), recipe.UNIT)
    world.print(f"plan: {len(train_set)} {recipe.UNIT}, global batch {options.global_batch} = micro-batch "
                f"{options.optim.micro_batch} x grad-accum {options.optim.grad_accum} x {world.size} processes, "
                f"{steps_per_epoch} steps per epoch, {total_steps} steps{recipe.describe(options)}")
    ds_config = read_ds_config(run_dir / "ds_config.json", total_steps)
    run = Run(options, world, run_dir, tokenizer, model, ds_config, train_set, eval_set, lengths, collate)
    state = recipe.setup(run)
    engine, _ = build_engine(model, checkpoints.ds_config(ds_config), options.optim.warmup_steps, total_steps)
    flops_per_token, peak = train_flops_per_token(model), peak_flops(options.optim.precision, world)  # for mfu
    progress = checkpoints.restore(engine)  # Progress() unless resuming
    engine.train()  # from_pretrained returns eval mode; training has dropout from its first step, resumed or not
    log = open_metrics(run_dir, world.is_main, total_steps, progress.step)

    step, epoch, position, record = progress.step, progress.epoch, progress.position, {}
    while step < total_steps:
        # A resumed epoch starts after the `position` batches its checkpoint had trained on.
        batches = step_batches(len(train_set), options.global_batch, options.schedule.seed, epoch,
                               lengths if options.data.group_by_length else None)[position:]
        for indices in batches:
            if step >= total_steps:
                break
            lr = current_lr(engine)
            started = time.perf_counter()
            stats = recipe.train_step(engine, run, state, indices)
            seconds = time.perf_counter() - started
            step, position = step + 1, position + 1
            skipped = check_loss(engine, stats["loss"], step, checkpoints)  # NaN/inf: TrainingError
            tokens_per_s = stats["input_tokens"] / seconds
            record = {"step": step, "epoch": epoch, **stats, "lr": lr, "tokens_per_s": tokens_per_s,
                      "mfu": mfu(flops_per_token, tokens_per_s, peak), **skipped}
            if eval_set and evaluation_due(step, total_steps, options.schedule.eval_every):
                record.update(recipe.evaluate(engine, run, state))
            if step % options.schedule.log_every == 0 or "eval_loss" in record or step == total_steps:
                log.log(record)
            log.progress(1, **{name: stats[name] for name in recipe.PROGRESS}, lr=lr, tok_s=tokens_per_s,
                         mfu=record["mfu"])
            checkpoints.save_if_due(engine, tokenizer, Progress(step, epoch, position))
        epoch, position = epoch + 1, 0

    log.close()
    if "eval_loss" in record:
        world.print(f"eval: {recipe.eval_summary(record)}")
    report_skipped_steps(engine, total_steps, world)  # fp16 overflows
    final = save_final(engine, tokenizer, run_dir, world)
    world.print(f"saved {final}")
    return engine


def main(recipe: Recipe, usage: str) -> None:
    """`python -m dialogtrain.sft RUN/run.json` (or dpo): the run in the process group torchrun made."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: {usage}")

    def run() -> None:
        with distributed_world() as world:
            train(Path(sys.argv[1]), world, recipe)

    exit_on_user_error(run)


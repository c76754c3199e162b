"""The training skeleton the methods share: set-up, the step loop with logging, evaluation and
checkpoints, the final save. A method (dialogtrain.sft, .dpo, .kto) brings its algorithm as a
`Recipe`: its data, its step, its evaluation.

    options -> checkpoints (refuse a bad --resume first) -> seed -> tokenizer -> data (a bad row stops
    the run before a large model loads) -> plan -> model (ZeRO-3: partitioned as it loads; LoRA
    adapters) -> engine -> packing check (through the engine) -> recipe.setup (the DPO reference)
    -> restore -> (--eval-on-start: evaluate the base model, as step 0) -> per optimizer step:
       recipe.train_step, NaN / fp16-skip checks, log, evaluate every --eval-every steps and at the end
       (once), checkpoint every --save-every steps -> RUN/final
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
from dialogtrain.data.mixture import EpochDraw
from dialogtrain.data.sampling import step_batches
from dialogtrain.errors import TrainingError, UserError, exit_on_user_error
from dialogtrain.export.adapter import export_merged, gather_adapted_state_dict
from dialogtrain.export.hf import cast_state_dict, export_hf_checkpoint, gather_state_dict
from dialogtrain.options import RunOptions
from dialogtrain.train.attention import attend_packed
from dialogtrain.train.checkpoints import Checkpoints
from dialogtrain.train.distributed import World, distributed_world
from dialogtrain.train.engine import build_engine, current_lr, grad_scaler, read_ds_config
from dialogtrain.train.lora import add_adapters, is_peft_model, quantization_args, trainable_summary
from dialogtrain.train.metrics import open_metrics
from dialogtrain.train.mfu import mfu, peak_flops, train_flops_per_token
from dialogtrain.train.model import load_model, load_tokenizer, recompute_activations
from dialogtrain.train.resume import Progress
from dialogtrain.train.rng import seed_everything


@dataclass(frozen=True)
class Run:
    """What a recipe's set-up, step and evaluation read: the resolved run, its data, how batches are built.
    `model` is the policy the engine wraps (a LoRA policy is its own DPO reference, adapters disabled)."""

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
    """A training method: the module-level names of dialogtrain/sft.py, dpo.py and kto.py."""

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
        """What the step needs besides the engine, built once the engine exists: the DPO reference. Passed
        to train_step and evaluate as `state`."""

    def describe(self, options: RunOptions) -> str:
        """The method's part of the start-up plan line."""

    def train_step(self, engine, run: Run, state: Any, indices: list[int]) -> dict[str, float]:
        """One optimizer step over the global batch `indices` (example indices, the same on every rank):
        its metrics (loss, grad_norm, input_tokens, target_tokens and the method's own), all ranks summed,
        and skipped (bool: fp16 skipped the update, train.engine.optimizer_step)."""

    def evaluate(self, engine, run: Run, state: Any) -> dict[str, float]:
        """`eval_` metrics over the whole eval set, all ranks together."""

    def eval_summary(self, metrics: dict[str, float]) -> str:
        """The line printed after the final evaluation."""


def weight_dtype(options: RunOptions) -> str:
    """The dtype the model loads in: bf16 for --precision pure-bf16; with LoRA, the frozen base in the compute
    dtype (nothing updates it, so 16 bits lose nothing and halve its memory; PEFT keeps the adapters fp32);
    else fp32 (mixed precision keeps fp32 weights and computes under autocast)."""
    if options.optim.precision == "pure-bf16":
        return "bfloat16"
    return options.optim.compute_dtype if options.lora.enabled else "float32"


def plan_steps(options: RunOptions, num_examples: int, unit: str) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps). Refuses data smaller than one global batch."""
    steps_per_epoch = num_examples // options.global_batch
    if steps_per_epoch == 0:
        raise UserError(f"--data has {num_examples} {unit}, fewer than one global batch of "
                        f"{options.global_batch} (--micro-batch x --grad-accum x processes)")
    return steps_per_epoch, options.schedule.max_steps or steps_per_epoch * options.schedule.epochs


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`; its ints (lengths, counts the collate made) stay Python ints."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# fp16 mixed precision: this many updates skipped in a row (gradients overflowing at every loss scale the
# GradScaler tries, from 65536 down to 2^-8) means the forward itself overflows: the run stops.
MAX_CONSECUTIVE_SKIPS = 25


def check_loss(engine, loss: float, step: int, skipped: bool, checkpoints: Checkpoints) -> dict:
    """Extra metrics of the step (under fp16: skipped_steps, and skipped: true for a skipped update);
    TrainingError when the run must stop.

    Under fp16 dynamic loss scaling an overflow is routine: the update is skipped and the loss scale
    lowered, so a non-finite loss of a skipped step is counted, not fatal. Anywhere else (fp32, bf16, or
    an fp16 step that was applied) a NaN/inf loss stops the run before anything of it is saved.
    """
    fp16 = grad_scaler(engine) is not None
    if math.isfinite(loss) or (fp16 and skipped):
        return {"skipped_steps": engine.skipped_steps, **({"skipped": True} if skipped else {})} if fp16 else {}
    raise TrainingError(f"loss is {loss} at step {step}; stopping, nothing of this step is saved. "
                        f"{checkpoints.last_good()}")


def check_skips(consecutive: int, step: int, checkpoints: Checkpoints) -> None:
    """TrainingError after MAX_CONSECUTIVE_SKIPS skipped fp16 updates in a row."""
    if consecutive >= MAX_CONSECUTIVE_SKIPS:
        raise TrainingError(f"fp16: the last {consecutive} updates (to step {step}) were all skipped: the gradients "
                            "overflow at every loss scale, so the forward pass itself overflows fp16; stopping. "
                            f"{checkpoints.last_good()} Continue with --precision bf16 (on a GPU with it) or fp32, "
                            "or a lower --lr.")


def report_skipped_steps(engine, total_steps: int, world: World) -> None:
    """Under fp16, one line on the updates that were skipped (gradient overflow)."""
    if grad_scaler(engine) is not None and engine.skipped_steps:
        world.print(f"fp16: {engine.skipped_steps} of {total_steps} optimizer steps were skipped (gradient "
                    "overflow; the loss scale was lowered each time)")


def evaluation_due(step: int, total_steps: int, eval_every: int) -> bool:
    """Evaluate every --eval-every steps and after the last step, never twice for one step."""
    return step == total_steps or (eval_every > 0 and step % eval_every == 0)


def save_final(engine, tokenizer, run_dir: Path, world: World, dtype: str = "float32") -> Path:
    """RUN/final: the consolidated Hugging Face folder, its weights in `dtype` (options.optim.export_dtype),
    written by rank 0 after every rank gathered; a LoRA run's adapters merged into it and saved in
    final/adapter (export.adapter)."""
    lora = is_peft_model(engine.module)
    state_dict = gather_adapted_state_dict(engine) if lora else gather_state_dict(engine)
    final = run_dir / "final"
    if world.is_main and lora:
        export_merged(engine.module, state_dict, tokenizer, final, getattr(torch, dtype))
    elif world.is_main:
        export_hf_checkpoint(engine.module, cast_state_dict(state_dict, getattr(torch, dtype)), tokenizer, final)
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
    steps_per_epoch, total_steps = plan_steps(options, len(train_set), recipe.UNIT)
    ds_config = read_ds_config(run_dir / "ds_config.json", total_steps)
    model = load_model(options.model.model, tokenizer, options.model.trust_remote_code,
                       quantization_args(options, world.device),  # QLoRA: the base in 4 bits
                       ds_config=ds_config, dtype=weight_dtype(options))  # ZeRO-3: partitioned as it loads
    # the plain model gets the packed-row attention (and is set to recompute) before LoRA wraps it
    if options.data.packing:
        attend_packed(model)
    if options.optim.gradient_checkpointing:
        recompute_activations(model)
    model = add_adapters(model, options)  # --lora-r: only the adapters train
    checkpoints.check_space(model)
    recipe.prepare_model(model)
    lengths = [recipe.example_length(e) for e in train_set]
    draw = EpochDraw.of(options.data.data, [e.get("source", "") for e in train_set], options.schedule.seed)
    world.print(f"plan: {len(train_set)} {recipe.UNIT}, global batch {options.global_batch} = micro-batch "
                f"{options.optim.micro_batch} x grad-accum {options.optim.grad_accum} x {world.size} processes, "
                f"{steps_per_epoch} steps per epoch, {total_steps} steps{recipe.describe(options)}; "
                f"{trainable_summary(model)}")
    engine, _ = build_engine(model, checkpoints.ds_config(ds_config), options.optim.warmup_steps, total_steps)
    # the packing check runs through the engine: on the run's device, in its precision, ZeRO-3 gathering
    collate = choose_collate(recipe.collate, options.data.packing, engine, tokenizer.pad_token_id, world.print)
    run = Run(options, world, run_dir, tokenizer, model, ds_config, train_set, eval_set, lengths, collate)
    state = recipe.setup(run)  # the DPO reference loads its own weights: it never copies the policy
    flops_per_token, peak = train_flops_per_token(model), peak_flops(options.optim.precision, world)  # for mfu
    progress = checkpoints.restore(engine)  # Progress() unless resuming
    engine.train()  # from_pretrained returns eval mode; training has dropout from its first step, resumed or not
    before = None
    if eval_set and options.schedule.eval_on_start and progress.step == 0:  # the base model, as step 0
        before = {"step": 0, "epoch": 0, **recipe.evaluate(engine, run, state)}
        world.print(f"eval before training: {recipe.eval_summary(before)}")
    log = open_metrics(run_dir, world.is_main, total_steps, progress.step, options)  # and --report-to's trackers
    if before:
        log.log(before)

    step, epoch, position, record = progress.step, progress.epoch, progress.position, {}
    consecutive_skips = 0
    while step < total_steps:
        # The epoch's examples (a weighted --data mixture draws them; else all), cut into steps. A resumed
        # epoch starts after the `position` batches its checkpoint had trained on.
        pool = draw.examples(epoch)
        batches = [[pool[i] for i in batch] for batch in step_batches(
            len(pool), options.global_batch, options.schedule.seed, epoch,
            [lengths[i] for i in pool] if options.data.group_by_length else None)[position:]]
        for indices in batches:
            if step >= total_steps:
                break
            lr = current_lr(engine)
            started = time.perf_counter()
            stats = recipe.train_step(engine, run, state, indices)
            seconds = time.perf_counter() - started
            step, position = step + 1, position + 1
            skipped = stats.pop("skipped")
            fp16_metrics = check_loss(engine, stats["loss"], step, skipped, checkpoints)  # NaN/inf: TrainingError
            consecutive_skips = consecutive_skips + 1 if skipped else 0
            check_skips(consecutive_skips, step, checkpoints)
            tokens_per_s = stats["input_tokens"] / seconds
            record = {"step": step, "epoch": epoch, **stats, "lr": lr, "tokens_per_s": tokens_per_s,
                      "mfu": mfu(flops_per_token, tokens_per_s, peak), **fp16_metrics}
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
    final = save_final(engine, tokenizer, run_dir, world, options.optim.export_dtype)
    world.print(f"saved {final}")
    return engine


def main(recipe: Recipe, usage: str) -> None:
    """`python -m dialogtrain.sft RUN/run.json` (or dpo): the run in the process group torchrun made."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: {usage}")

    def run() -> None:
        run_json = Path(sys.argv[1])
        with distributed_world(RunOptions.load(run_json).launch.dist_timeout) as world:
            train(run_json, world, recipe)

    exit_on_user_error(run)


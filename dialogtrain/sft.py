"""Supervised fine-tuning on a DeepSpeed engine, top to bottom.

    torchrun ... -m dialogtrain.sft RUN/run.json

setup (options, data, engine) -> train_step per optimizer step -> evaluate -> save_final.
Only assistant tokens are learned. The loss of a step is the summed token cross-entropy divided
by the target tokens of the whole step (all micro-batches, all ranks), so the update does not
depend on how the step is split into processes, micro-batches and accumulation.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dialogtrain.batching import (
    Collate,
    choose_collate,
    collate_sft,
    eval_micro_batches_of_rank,
    input_token_count,
    micro_batches_of_rank,
    step_batches,
    target_tokens,
)
from dialogtrain.checkpoints import Checkpoints, Progress, TrainingError  # noqa: F401 (TrainingError: re-exported)
from dialogtrain.distributed import World, distributed_world
from dialogtrain.engine import (
    batch_sequence_logps,
    boundary_step,
    build_engine,
    current_lr,
    learned_logits,
    read_ds_config,
)
from dialogtrain.errors import UserError, exit_on_user_error
from dialogtrain.export import export_hf_checkpoint, gather_state_dict
from dialogtrain.losses import sft_loss
from dialogtrain.metrics import mfu, open_metrics, peak_flops, train_flops_per_token
from dialogtrain.model import load_model, load_tokenizer, recompute_activations
from dialogtrain.options import RunOptions


def setup_data(options: RunOptions, tokenizer, world: World) -> tuple[list[dict], list[dict]]:
    """Load, validate and encode the train (and eval) conversations; print the counts once."""
    from dialogtrain.data import load_conversations
    from dialogtrain.formatting import encode_conversations

    def encode(source: str, name: str) -> list[dict]:
        conversations, report = load_conversations(source, skip_bad_rows=options.data.skip_bad_rows)
        examples, stats = encode_conversations(tokenizer, conversations, options.data.max_length)
        world.print(f"{name} {report.summary()}")
        world.print(f"{name} {stats.summary()}")
        if not examples:
            raise UserError(f"{source}: no example has a learnable assistant token")
        return examples

    train_set = encode(options.data.data, "train")
    eval_set = encode(options.data.eval_data, "eval") if options.data.eval_data else []
    return train_set, eval_set


def plan_steps(options: RunOptions, num_examples: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps). Refuses data smaller than one global batch."""
    steps_per_epoch = num_examples // options.global_batch
    if steps_per_epoch == 0:
        raise UserError(f"--data has {num_examples} examples, fewer than one global batch of "
                        f"{options.global_batch} (--micro-batch x --grad-accum x processes)")
    return steps_per_epoch, options.schedule.max_steps or steps_per_epoch * options.schedule.epochs


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(engine, examples: list[dict], lengths: list[int], step: list[int], options: RunOptions,
               world: World, collate: Collate) -> dict[str, float]:
    """One optimizer step over the global batch `step` (example indices, identical on every rank)."""
    step_targets = sum(target_tokens(examples[i]) for i in step)  # N_step: all ranks, all micro-batches
    # engine.backward divides by grad-accum and data parallelism averages over ranks: undo both once,
    # so the summed gradient is d(sum of token losses)/N_step.
    backward_scale = options.optim.grad_accum * world.size
    micro_batches = micro_batches_of_rank(step, lengths, world.rank, world.size, options.optim.micro_batch)
    loss, input_tokens, grad_norm = 0.0, 0, math.nan
    for k, indices in enumerate(micro_batches):
        batch = to_device(collate([examples[i] for i in indices]), world.device)
        logits = learned_logits(engine, batch)  # (N, V) at the learned positions only
        micro_loss = sft_loss(logits, batch["labels"], step_targets)  # this micro-batch's share, scalar
        engine.backward(micro_loss * backward_scale)
        if k == len(micro_batches) - 1:
            grad_norm = boundary_step(engine)
        else:
            engine.step()
        loss += micro_loss.item()
        input_tokens += input_token_count(batch)
    loss, input_tokens = world.sum(loss, input_tokens)
    return {"loss": loss, "grad_norm": grad_norm, "input_tokens": input_tokens, "target_tokens": step_targets}


@torch.no_grad()
def evaluate(engine, examples: list[dict], options: RunOptions, world: World, collate: Collate) -> dict[str, float]:
    """Mean assistant-token loss and perplexity over the whole eval set, all ranks together."""
    engine.eval()
    nll, tokens = 0.0, 0
    for indices in eval_micro_batches_of_rank(len(examples), world.rank, world.size, options.optim.micro_batch):
        # A rank out of examples still runs a forward (ZeRO-3 gathers are collective) and counts nothing.
        batch = to_device(collate([examples[i] for i in indices or [0]]), world.device)
        logps, n = batch_sequence_logps(engine, batch)
        if indices:
            nll -= float(logps.sum())
            tokens += int(n.sum())
    engine.train()
    nll, tokens = world.sum(nll, tokens)
    loss = nll / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def save_final(engine, tokenizer, run_dir: Path, world: World) -> Path:
    """RUN/final: the consolidated Hugging Face folder, written by rank 0 after every rank gathered."""
    state_dict = gather_state_dict(engine)
    final = run_dir / "final"
    if world.is_main:
        export_hf_checkpoint(engine.module, state_dict, tokenizer, final)
    world.barrier()
    return final


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(run_json: Path, world: World):
    """The whole run. Returns the engine (tests compare its model with the export)."""
    options = RunOptions.load(run_json)
    run_dir = run_json.parent
    checkpoints = Checkpoints.open(run_dir, options, world)  # an unwritable folder or refused --resume stops here
    seed_everything(options.schedule.seed)
    # The data first: a bad row stops the run in seconds, before a large model loads.
    tokenizer = load_tokenizer(options.model.model, options.model.trust_remote_code, options.model.chat_template)
    train_set, eval_set = setup_data(options, tokenizer, world)
    model, tokenizer = load_model(options.model.model, options.model.trust_remote_code, options.model.chat_template)
    checkpoints.check_space(model)
    collate = choose_collate(collate_sft, options.data.packing, model, tokenizer.pad_token_id, world.print)
    if options.optim.gradient_checkpointing:
        recompute_activations(model)
    lengths = [len(e["input_ids"]) for e in train_set]
    steps_per_epoch, total_steps = plan_steps(options, len(train_set))
    world.print(f"plan: {len(train_set)} examples, global batch {options.global_batch} = micro-batch "
                f"{options.optim.micro_batch} x grad-accum {options.optim.grad_accum} x {world.size} processes, "
                f"{steps_per_epoch} steps per epoch, {total_steps} steps")
    ds_config = read_ds_config(run_dir / "ds_config.json", total_steps)
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
        for batch_indices in batches:
            if step >= total_steps:
                break
            lr = current_lr(engine)
            started = time.perf_counter()
            stats = train_step(engine, train_set, lengths, batch_indices, options, world, collate)
            seconds = time.perf_counter() - started
            step, position = step + 1, position + 1
            skipped = checkpoints.check_loss(engine, stats["loss"], step)  # NaN/inf: TrainingError
            tokens_per_s = stats["input_tokens"] / seconds
            record = {"step": step, "epoch": epoch, "loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
                      "tokens_per_s": tokens_per_s, "mfu": mfu(flops_per_token, tokens_per_s, peak),
                      "input_tokens": stats["input_tokens"], "target_tokens": stats["target_tokens"], **skipped}
            if eval_set and (step == total_steps or (options.schedule.eval_every
                                                        and step % options.schedule.eval_every == 0)):
                record.update(evaluate(engine, eval_set, options, world, collate))
            if step % options.schedule.log_every == 0 or "eval_loss" in record or step == total_steps:
                log.log(record)
            log.progress(1, loss=stats["loss"], lr=lr, tok_s=tokens_per_s, mfu=record["mfu"])
            checkpoints.step_done(engine, tokenizer, Progress(step, epoch, position))  # saves every --save-every
        epoch, position = epoch + 1, 0

    log.close()
    if "eval_loss" in record:
        world.print(f"eval: loss {record['eval_loss']:.4f}, perplexity {record['eval_ppl']:.2f}")
    checkpoints.report_skipped_steps(engine, total_steps)  # fp16 overflows
    final = save_final(engine, tokenizer, run_dir, world)
    world.print(f"saved {final}")
    return engine


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dialogtrain.sft RUN/run.json")

    def run() -> None:
        with distributed_world() as world:
            train(Path(sys.argv[1]), world)

    exit_on_user_error(run)


if __name__ == "__main__":
    main()

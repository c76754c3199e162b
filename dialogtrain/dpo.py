"""Direct Preference Optimization on a DeepSpeed engine, top to bottom.

    torchrun ... -m dialogtrain.dpo RUN/run.json

setup (options, data, reference, engine) -> train_step per optimizer step -> evaluate -> save_final.
A micro-batch of B pairs is one batch of 2B sequences, chosen first (one packed row, or 2B padded
rows with --no-packing), scored by one policy forward: the per-sequence sums of completion
log-probs (sequence_logps, fp32) and the reference's give the loss picked once by --loss. The loss
of a step is the mean over the pairs of the whole step (all micro-batches, all ranks), so the update
does not depend on how the step is split into processes, micro-batches and accumulation.

The reference is a frozen copy of the starting policy (or --ref-model) under its own DeepSpeed
engine, or, with --precompute-ref, a table of its log-probs computed once before training, cached
in RUN/ref_logps.pt and reused while it matches; then no reference model exists during training.
Dropout is off in both models (TRL does the same): with it the policy's log-ratio against the
reference starts as noise, not 0.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dialogtrain.attention import prepare_for_packing
from dialogtrain.batching import (
    Collate,
    choose_collate,
    collate_preferences,
    eval_micro_batches_of_rank,
    input_token_count,
    micro_batches_of_rank,
    step_batches,
)
from dialogtrain.checkpoints import Checkpoints, Progress
from dialogtrain.distributed import World, distributed_world
from dialogtrain.engine import (
    batch_sequence_logps,
    boundary_step,
    build_engine,
    current_lr,
    hidden_size,
    read_ds_config,
    resolve_auto_sizes,
)
from dialogtrain.errors import UserError, exit_on_user_error
from dialogtrain.export import export_hf_checkpoint, gather_state_dict
from dialogtrain.losses import DPO_LOSSES, chosen_nll
from dialogtrain.metrics import mfu, open_metrics, peak_flops, train_flops_per_token
from dialogtrain.model import load_model, load_tokenizer, recompute_activations, resolve_model_path
from dialogtrain.options import RunOptions

REFERENCE_CACHE = "ref_logps.pt"
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def setup_data(options: RunOptions, tokenizer, world: World) -> tuple[list[dict], list[dict]]:
    """Load, validate and encode the train (and eval) preference pairs; print the counts once."""
    from dialogtrain.data import load_preferences
    from dialogtrain.formatting import encode_preferences

    def encode(source: str, name: str) -> list[dict]:
        preferences, report = load_preferences(source, skip_bad_rows=options.data.skip_bad_rows)
        examples, stats = encode_preferences(tokenizer, preferences, options.data.max_length)
        world.print(f"{name} {report.summary()}")
        world.print(f"{name} {stats.summary()}")
        if not examples:
            raise UserError(f"{source}: no preference pair has a learnable token on both sides")
        return examples

    train_set = encode(options.data.data, "train")
    eval_set = encode(options.data.eval_data, "eval") if options.data.eval_data else []
    return train_set, eval_set


# ----------------------------------------------------------------------------------------------------
# the reference: a frozen model under its own engine, or its log-probs computed once


class LiveReference:
    """The frozen reference model under its own DeepSpeed engine: one no-grad forward per micro-batch."""

    def __init__(self, engine):
        self.engine = engine

    @torch.no_grad()
    def logps(self, indices: list[int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B,) summed completion log-probs of the batch's rows (chosen, then rejected), fp32."""
        return batch_sequence_logps(self.engine, batch)[0]


class CachedReference:
    """Reference log-probs of every pair, looked up by pair index (--precompute-ref)."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # (N, 2): chosen, rejected; fp32 on CPU

    def logps(self, indices: list[int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = self.table[indices]  # (B, 2)
        return torch.cat([rows[:, 0], rows[:, 1]]).to(batch["input_ids"].device)  # (2B,) chosen, then rejected


def setup_reference(options: RunOptions, policy: torch.nn.Module, tokenizer, ds_config: dict,
                    train_set: list[dict], eval_set: list[dict], run_dir: Path, world: World, collate: Collate
                    ) -> tuple[LiveReference | CachedReference, LiveReference | CachedReference]:
    """(train reference, eval reference). Call before the policy's engine exists (ZeRO-3 partitions it).

    --precompute-ref: the cached table when RUN/ref_logps.pt matches on every rank, else one pass of
    the reference over train + eval pairs (each rank its share), saved by rank 0; the reference
    model and its engine are released before returning, so training holds the policy only.
    """
    if not options.dpo.precompute_ref:
        reference = LiveReference(build_reference_engine(load_reference_model(options, policy, tokenizer, collate),
                                                         ds_config))
        world.print(f"reference: {options.model.ref_model or 'a frozen copy of --model'}, ZeRO stage "
                    f"{reference.engine.zero_optimization_stage()}, kept for the whole run")
        return reference, reference

    examples = train_set + eval_set
    fingerprint = reference_fingerprint(options, examples)
    cache = run_dir / REFERENCE_CACHE
    table = read_reference_cache(cache, fingerprint)
    found_everywhere = world.sum(float(table is not None))[0] == world.size
    if found_everywhere:
        world.print(f"reference log-probs: reusing {cache}")
    else:
        engine = build_reference_engine(load_reference_model(options, policy, tokenizer, collate), ds_config)
        started = time.perf_counter()
        table = precompute_reference_logps(LiveReference(engine), examples, options, world, collate)
        if world.is_main:
            tmp = cache.with_name(cache.name + ".tmp")
            torch.save({"fingerprint": fingerprint, "logps": table}, tmp)
            tmp.replace(cache)
        world.barrier()
        world.print(f"reference log-probs of {len(examples)} pairs computed in "
                    f"{time.perf_counter() - started:.1f}s, cached in {cache}")
        engine.destroy()
        del engine
        gc.collect()
    return CachedReference(table[:len(train_set)]), CachedReference(table[len(train_set):])


def load_reference_model(options: RunOptions, policy: torch.nn.Module, tokenizer, collate: Collate
                         ) -> torch.nn.Module:
    """--ref-model, or a copy of the starting policy; eval mode, no gradients.

    A --ref-model must share the policy's tokenizer: both score the same token ids; and, when the
    policy's batches are packed, keep packed examples apart too: both score the same batches.
    """
    if options.model.ref_model:
        reference, ref_tokenizer = load_model(options.model.ref_model, options.model.trust_remote_code)
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"--ref-model {options.model.ref_model}: its tokenizer differs from --model's "
                            f"{options.model.model}; both models must score the same token ids")
        if collate.keywords["packed"] and not prepare_for_packing(reference):
            raise UserError(f"--ref-model {options.model.ref_model}: it lets examples packed into one row attend "
                            f"to each other, unlike --model; run with --no-packing")
    else:
        reference = copy.deepcopy(policy)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def reference_ds_config(ds_config: dict) -> dict:
    """The policy's DeepSpeed config for a frozen model: same precision and batch sizes, no optimizer,
    scheduler or clipping. ZeRO-3 (with its parameter offload, if any) when the policy is at ZeRO-3,
    since a full replica would not fit where the policy needs sharding; stage 0 otherwise.
    """
    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        config.pop(key, None)
    zero = config.get("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        zero.pop("offload_optimizer", None)
    else:
        config["zero_optimization"] = {"stage": 0}
    return config


def build_reference_engine(reference: torch.nn.Module, ds_config: dict):
    import deepspeed

    config = resolve_auto_sizes(reference_ds_config(ds_config), hidden_size(reference))
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    engine.eval()
    return engine


def reference_fingerprint(options: RunOptions, examples: list[dict]) -> str:
    """sha256 of what the reference log-probs depend on: the reference model (id and, for a folder, its
    files' names, sizes and times), the precision, max_length, and every pair's ids and labels.
    """
    model = options.model.ref_model or options.model.model
    path = Path(resolve_model_path(model))
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()) \
        if path.is_dir() else []
    digest = hashlib.sha256(json.dumps({"model": str(path), "files": files, "precision": options.optim.precision,
                                        "max_length": options.data.max_length}).encode())
    for example in examples:
        digest.update(json.dumps([example["chosen_ids"], example["chosen_labels"], example["rejected_ids"],
                                  example["rejected_labels"]]).encode())
    return digest.hexdigest()


def read_reference_cache(path: Path, fingerprint: str) -> torch.Tensor | None:
    """The cached (N, 2) table when `path` exists and its fingerprint matches, else None."""
    if not path.exists():
        return None
    cached = torch.load(path, map_location="cpu", weights_only=True)
    return cached["logps"] if cached.get("fingerprint") == fingerprint else None


@torch.no_grad()
def precompute_reference_logps(reference: LiveReference, examples: list[dict], options: RunOptions,
                               world: World, collate: Collate) -> torch.Tensor:
    """(N, 2) reference log-probs (chosen, rejected) of every pair, the same on every rank.

    Each rank scores its share; each entry is written by exactly one rank into a zero table, so the
    all-reduce (a sum) gathers the table exactly.
    """
    import torch.distributed as dist

    table = torch.zeros(len(examples), 2, dtype=torch.float64, device=world.device)
    for indices in eval_micro_batches_of_rank(len(examples), world.rank, world.size, options.optim.micro_batch):
        # A rank out of pairs still runs a forward (ZeRO-3 gathers are collective) and writes nothing.
        batch = to_device(collate([examples[i] for i in indices or [0]]), world.device)
        chosen, rejected = reference.logps(indices, batch).chunk(2)
        if indices:
            table[indices] = torch.stack([chosen, rejected], dim=1).double()
    if world.size > 1:
        dist.all_reduce(table)
    return table.float().cpu()


# ----------------------------------------------------------------------------------------------------
# the loop


def plan_steps(options: RunOptions, num_examples: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps). Refuses data smaller than one global batch."""
    steps_per_epoch = num_examples // options.global_batch
    if steps_per_epoch == 0:
        raise UserError(f"--data has {num_examples} pairs, fewer than one global batch of "
                        f"{options.global_batch} (--micro-batch x --grad-accum x processes)")
    return steps_per_epoch, options.schedule.max_steps or steps_per_epoch * options.schedule.epochs


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def score_pairs(logps: torch.Tensor, n_tokens: torch.Tensor, ref_logps: torch.Tensor, options: RunOptions
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """(per-pair losses (B,), summed pair metrics) of a micro-batch from its (2B,) policy and reference
    log-probs and completion token counts, chosen rows first.

    loss_b = DPO_LOSSES[--loss](...)_b + rpo_alpha * (mean token NLL of chosen_b).
    """
    policy_chosen, policy_rejected = logps.chunk(2)  # (B,) each
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_tokens, rejected_tokens = n_tokens.chunk(2)
    losses, chosen_rewards, rejected_rewards = DPO_LOSSES[options.dpo.loss](
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, options.dpo.beta, options.dpo.label_smoothing,
        chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    losses = losses + options.dpo.rpo_alpha * chosen_nll(policy_chosen, chosen_tokens)
    sums = {"loss": losses.detach().sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": policy_chosen.detach().sum(),
            "logps/rejected": policy_rejected.detach().sum()}
    return losses, dict(zip(sums, torch.stack(list(sums.values())).tolist(), strict=True))  # one device sync


def train_step(engine, reference, examples: list[dict], lengths: list[int], step: list[int], options: RunOptions,
               world: World, collate: Collate) -> dict[str, float]:
    """One optimizer step over the global batch `step` (pair indices, identical on every rank).

    Returns the step's pair metrics as means over all its pairs (all micro-batches, all ranks).
    """
    step_pairs = len(step)  # P_step: all ranks, all micro-batches
    # engine.backward divides by grad-accum and data parallelism averages over ranks: undo both once,
    # so the summed gradient is d(sum of pair losses)/P_step.
    backward_scale = options.optim.grad_accum * world.size
    micro_batches = micro_batches_of_rank(step, lengths, world.rank, world.size, options.optim.micro_batch)
    sums, input_tokens, target_tokens, grad_norm = dict.fromkeys(PAIR_METRICS, 0.0), 0, 0, math.nan
    for k, indices in enumerate(micro_batches):
        batch = to_device(collate([examples[i] for i in indices]), world.device)  # 2B sequences
        ref_logps = reference.logps(indices, batch)  # (2B,), before the policy's activations exist
        logps, n_tokens = batch_sequence_logps(engine, batch)  # (2B,) each, fp32
        losses, micro_sums = score_pairs(logps, n_tokens, ref_logps, options)
        engine.backward(losses.sum() / step_pairs * backward_scale)
        if k == len(micro_batches) - 1:
            grad_norm = boundary_step(engine)
        else:
            engine.step()
        sums = {name: sums[name] + micro_sums[name] for name in PAIR_METRICS}
        input_tokens += input_token_count(batch)
        target_tokens += int(n_tokens.sum())
    *totals, input_tokens, target_tokens = world.sum(*sums.values(), input_tokens, target_tokens)
    means = {name: total / step_pairs for name, total in zip(PAIR_METRICS, totals, strict=True)}
    return {**means, "grad_norm": grad_norm, "input_tokens": input_tokens, "target_tokens": target_tokens}


@torch.no_grad()
def evaluate(engine, reference, examples: list[dict], options: RunOptions, world: World,
             collate: Collate) -> dict[str, float]:
    """The pair metrics as means over the whole eval set, all ranks together, prefixed `eval_`."""
    engine.eval()
    sums, pairs = dict.fromkeys(PAIR_METRICS, 0.0), 0
    for indices in eval_micro_batches_of_rank(len(examples), world.rank, world.size, options.optim.micro_batch):
        # A rank out of pairs still runs a forward (ZeRO-3 gathers are collective) and counts nothing.
        batch = to_device(collate([examples[i] for i in indices or [0]]), world.device)
        ref_logps = reference.logps(indices or [0], batch)
        logps, n_tokens = batch_sequence_logps(engine, batch)
        _, micro_sums = score_pairs(logps, n_tokens, ref_logps, options)
        if indices:
            sums = {name: sums[name] + micro_sums[name] for name in PAIR_METRICS}
            pairs += len(indices)
    engine.train()
    *totals, pairs = world.sum(*sums.values(), pairs)
    return {f"eval_{name}": total / max(pairs, 1) for name, total in zip(PAIR_METRICS, totals, strict=True)}


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


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


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
    disable_dropout(model)
    collate = choose_collate(collate_preferences, options.data.packing, model, tokenizer.pad_token_id, world.print)
    if options.optim.gradient_checkpointing:
        recompute_activations(model)  # the reference (a copy, or its own model) only runs without gradients
    lengths = [max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in train_set]
    steps_per_epoch, total_steps = plan_steps(options, len(train_set))
    world.print(f"plan: {len(train_set)} pairs, global batch {options.global_batch} pairs = micro-batch "
                f"{options.optim.micro_batch} x grad-accum {options.optim.grad_accum} x {world.size} processes, "
                f"{steps_per_epoch} steps per epoch, {total_steps} steps; --loss {options.dpo.loss}, "
                f"--beta {options.dpo.beta}, reference "
                f"{'precomputed' if options.dpo.precompute_ref else 'live'}")
    ds_config = read_ds_config(run_dir / "ds_config.json", total_steps)
    train_ref, eval_ref = setup_reference(options, model, tokenizer, ds_config, train_set, eval_set, run_dir, world,
                                         collate)
    engine, _ = build_engine(model, checkpoints.ds_config(ds_config), options.optim.warmup_steps, total_steps)
    # mfu counts the policy's 6N FLOPs per token; a live reference's forward (2N more) is not in it
    flops_per_token, peak = train_flops_per_token(model), peak_flops(options.optim.precision, world)
    progress = checkpoints.restore(engine)  # Progress() unless resuming
    engine.train()  # from_pretrained returns eval mode; training has dropout from its first step, resumed or not
    log = open_metrics(run_dir, world.is_main, total_steps, progress.step)

    step, epoch, position = progress.step, progress.epoch, progress.position
    while step < total_steps:
        # A resumed epoch starts after the `position` batches its checkpoint had trained on.
        batches = step_batches(len(train_set), options.global_batch, options.schedule.seed, epoch,
                               lengths if options.data.group_by_length else None)[position:]
        for batch_indices in batches:
            if step >= total_steps:
                break
            lr = current_lr(engine)
            started = time.perf_counter()
            stats = train_step(engine, train_ref, train_set, lengths, batch_indices, options, world, collate)
            seconds = time.perf_counter() - started
            step, position = step + 1, position + 1
            skipped = checkpoints.check_loss(engine, stats["loss"], step)  # NaN/inf: TrainingError
            pair_metrics = {name: stats[name] for name in PAIR_METRICS}
            tokens_per_s = stats["input_tokens"] / seconds
            record = {"step": step, "epoch": epoch, **pair_metrics, "lr": lr, "grad_norm": stats["grad_norm"],
                      "tokens_per_s": tokens_per_s, "mfu": mfu(flops_per_token, tokens_per_s, peak),
                      "input_tokens": stats["input_tokens"], "target_tokens": stats["target_tokens"], **skipped}
            if options.schedule.eval_every and step % options.schedule.eval_every == 0 and eval_set:
                record.update(evaluate(engine, eval_ref, eval_set, options, world, collate))
            if step % options.schedule.log_every == 0 or "eval_loss" in record or step == total_steps:
                log.log(record)
            log.progress(1, **pair_metrics, lr=lr, tok_s=tokens_per_s, mfu=record["mfu"])
            checkpoints.step_done(engine, tokenizer, Progress(step, epoch, position))  # saves every --save-every
        epoch, position = epoch + 1, 0

    if eval_set:
        final_eval = evaluate(engine, eval_ref, eval_set, options, world, collate)
        log.log({"step": step, "epoch": epoch, **final_eval})
        world.print(f"eval: loss {final_eval['eval_loss']:.4f}, reward accuracy "
                    f"{final_eval['eval_rewards/accuracies']:.3f}, margin {final_eval['eval_rewards/margins']:.4f}")
    log.close()
    checkpoints.report_skipped_steps(engine, total_steps)  # fp16 overflows
    final = save_final(engine, tokenizer, run_dir, world)
    world.print(f"saved {final}")
    return engine


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dialogtrain.dpo RUN/run.json")

    def run() -> None:
        with distributed_world() as world:
            train(Path(sys.argv[1]), world)

    exit_on_user_error(run)


if __name__ == "__main__":
    main()

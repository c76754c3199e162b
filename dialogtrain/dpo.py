"""Direct Preference Optimization: the step and the evaluation of the DPO recipe (the loop is train.loop's).

    torchrun ... -m dialogtrain.dpo RUN/run.json

A micro-batch of B pairs is one batch of 2B sequences, chosen first (one packed row, or 2B padded
rows with --no-packing), scored by one policy forward: the per-sequence sums of completion
log-probs (sequence_logps, fp32) and the reference's (train.reference) give the loss picked once by
--loss; ORPO and SimPO read the policy's alone (no reference model exists). The loss of a step is the mean over the pairs of the whole step (all micro-batches, all
ranks), so the update does not depend on how the step is split into processes, micro-batches and
accumulation. Dropout is off in both models (TRL does the same): with it the policy's log-ratio
against the reference starts as noise, not 0.
"""

from __future__ import annotations

import math
import sys

import torch

from dialogtrain.data.collate import collate_preferences, input_token_count
from dialogtrain.data.sampling import eval_micro_batches_of_rank, micro_batches_of_rank
from dialogtrain.options import RunOptions, flag
from dialogtrain.train import loop
from dialogtrain.train.distributed import World
from dialogtrain.train.engine import optimizer_step
from dialogtrain.train.forward import batch_sequence_logps
from dialogtrain.train.loop import Run, to_device
from dialogtrain.train.losses import PREFERENCE_LOSSES, chosen_nll
from dialogtrain.train.reference import Reference, setup_reference
from dialogtrain.train.source_metrics import SourceTotals

UNIT = "pairs"
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")
PROGRESS = PAIR_METRICS
collate = collate_preferences


def load_examples(options: RunOptions, tokenizer, world: World) -> tuple[list[dict], list[dict]]:
    """The train (and eval) preference pairs: loaded, validated, de-duplicated, encoded (data.prepare); the
    counts printed once."""
    from dialogtrain.data.prepare import PREFERENCES, prepare_examples

    return prepare_examples(options, PREFERENCES, tokenizer, world.print)


def example_length(example: dict) -> int:
    return max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def prepare_model(model: torch.nn.Module) -> None:
    """No dropout: the policy's first log-ratio against the reference must be 0, not noise."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def setup(run: Run) -> tuple[Reference, Reference]:
    """(train reference, eval reference): live, or log-probs precomputed once (train.reference)."""
    return setup_reference(run)


def describe(options: RunOptions) -> str:
    loss = PREFERENCE_LOSSES[options.dpo.loss]
    settings = "".join(f", {flag(name)} {getattr(options.dpo, name)}" for name in loss.options)
    reference = ("precomputed" if options.dpo.precompute_ref else "live") if loss.reference else "none"
    return f"; --loss {options.dpo.loss}{settings}, reference {reference}"


def loss_settings(options: RunOptions) -> dict[str, object]:
    """The options the --loss takes as keyword arguments (PREFERENCE_LOSSES' facts), by name."""
    return {name: getattr(options.dpo, name) for name in PREFERENCE_LOSSES[options.dpo.loss].options}


def metric_names(options: RunOptions) -> tuple[str, ...]:
    """PAIR_METRICS and the --loss's own (ORPO: nll_loss, log_odds_ratio, log_odds_chosen)."""
    return PAIR_METRICS + PREFERENCE_LOSSES[options.dpo.loss].metrics


def score_pairs(logps: torch.Tensor, n_tokens: torch.Tensor, ref_logps: torch.Tensor | None, options: RunOptions
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair losses (B,), summed pair metrics (M,) in metric_names order, on the device: the step reads
    them back once, not per micro-batch) of a micro-batch from its (2B,) policy and reference
    log-probs (None for a reference-free --loss) and completion token counts, chosen rows first.

    loss_b = PREFERENCE_LOSSES[--loss](...)_b + rpo_alpha * (mean token NLL of chosen_b).
    """
    loss = PREFERENCE_LOSSES[options.dpo.loss]
    policy_chosen, policy_rejected = logps.chunk(2)  # (B,) each
    reference = ref_logps.chunk(2) if loss.reference else ()  # (ref_chosen, ref_rejected)
    chosen_tokens, rejected_tokens = n_tokens.chunk(2)
    losses, chosen_rewards, rejected_rewards, *extras = loss.function(
        policy_chosen, policy_rejected, *reference, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
        **loss_settings(options))
    losses = losses + options.dpo.rpo_alpha * chosen_nll(policy_chosen, chosen_tokens)
    sums = {"loss": losses.detach().sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": policy_chosen.detach().sum(),
            "logps/rejected": policy_rejected.detach().sum(),
            **{name: extra.sum() for name, extra in zip(loss.metrics, extras, strict=True)}}
    return losses, torch.stack(list(sums.values()))  # (M,) in metric_names order, left on the device


def train_step(engine, run: Run, state: tuple[Reference, Reference], indices: list[int]) -> dict[str, float]:
    """One optimizer step over the global batch `indices` (pair indices, identical on every rank).

    Returns the step's pair metrics as means over all its pairs (all micro-batches, all ranks).
    """
    options, world, examples, (reference, _) = run.options, run.world, run.train_set, state
    step_pairs = len(indices)  # P_step: all ranks, all micro-batches
    # engine.backward divides by grad-accum and data parallelism averages over ranks: undo both once,
    # so the summed gradient is d(sum of pair losses)/P_step.
    backward_scale = options.optim.grad_accum * world.size
    micro_batches = micro_batches_of_rank(indices, run.lengths, world.rank, world.size, options.optim.micro_batch)
    names = metric_names(options)
    sums, input_tokens, target_tokens, grad_norm = torch.zeros(len(names), device=world.device), 0, 0, math.nan
    for k, micro in enumerate(micro_batches):
        batch = to_device(run.collate([examples[i] for i in micro]), world.device)  # 2B sequences
        ref_logps = reference.logps(micro, batch, engine)  # (2B,), before the policy's activations exist
        logps, n_tokens = batch_sequence_logps(engine, batch)  # (2B,) each, fp32
        losses, micro_sums = score_pairs(logps, n_tokens, ref_logps, options)
        engine.backward(losses.sum() / step_pairs * backward_scale)
        if k == len(micro_batches) - 1:
            grad_norm, applied = optimizer_step(engine)
        else:
            engine.step()
        sums += micro_sums
        input_tokens += input_token_count(batch)
        target_tokens += batch["target_tokens"]
    *totals, input_tokens, target_tokens = world.sum(*sums.tolist(), input_tokens, target_tokens)  # one read
    means = {name: total / step_pairs for name, total in zip(names, totals, strict=True)}
    return {**means, "grad_norm": grad_norm, "input_tokens": input_tokens, "target_tokens": target_tokens,
            "skipped": not applied}


@torch.no_grad()
def evaluate(engine, run: Run, state: tuple[Reference, Reference]) -> dict[str, float]:
    """The pair metrics as means over the whole eval set, all ranks together, prefixed `eval_`; with several
    data sources, the loss of each too (eval_loss/NAME)."""
    world, examples, (_, reference) = run.world, run.eval_set, state
    engine.eval()
    names = metric_names(run.options)
    sums, pairs, by_source = torch.zeros(len(names), device=world.device), 0, SourceTotals(examples)
    for micro in eval_micro_batches_of_rank(len(examples), world.rank, world.size, run.options.optim.micro_batch):
        # A rank out of pairs still runs a forward (ZeRO-3 gathers are collective) and counts nothing.
        batch = to_device(run.collate([examples[i] for i in micro or [0]]), world.device)
        ref_logps = reference.logps(micro or [0], batch, engine)
        logps, n_tokens = batch_sequence_logps(engine, batch)
        losses, micro_sums = score_pairs(logps, n_tokens, ref_logps, run.options)
        if micro:
            sums += micro_sums
            pairs += len(micro)
            if by_source:
                by_source.add(micro, losses.tolist(), [1] * len(micro))
    engine.train()
    *totals, pairs = world.sum(*sums.tolist(), pairs)
    return {**{f"eval_{name}": total / max(pairs, 1) for name, total in zip(names, totals, strict=True)},
            **by_source.means(world, "eval_loss")}


def eval_summary(metrics: dict[str, float]) -> str:
    return (f"loss {metrics['eval_loss']:.4f}, reward accuracy {metrics['eval_rewards/accuracies']:.3f}, "
            f"margin {metrics['eval_rewards/margins']:.4f}")


def train(run_json, world: World):
    """The whole DPO run: train.loop with this module as the recipe. Returns the engine."""
    return loop.train(run_json, world, sys.modules[__name__])


if __name__ == "__main__":
    loop.main(sys.modules[__name__], "python -m dialogtrain.dpo RUN/run.json")

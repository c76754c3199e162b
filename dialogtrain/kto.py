"""Kahneman-Tversky Optimization: the step and the evaluation of the KTO recipe (the loop is train.loop's).

    torchrun ... -m dialogtrain.kto RUN/run.json        (what `dialogtrain kto` starts)

KTO (Ethayarajh et al. 2024) learns from completions rated desirable or undesirable, unpaired: the thumbs
up and down of a chat's users (`dialogtrain chat --feedback`); a preference pair counts as one of each.
Each completion's log-ratio against the frozen reference (train.reference, live) is pushed above or
below a reference point z0: the policy's KL from the reference, estimated on mismatched pairs of the
same step, example k's prompt with the completion of example k + 1 in the step's order (the last with
the first), as the paper and TRL do. z0 carries no gradient, so a step first measures it in a no-grad
pass (the policy on the KL rows; the reference on the step's rows and KL rows, one forward per
micro-batch), then every example's loss uses the one z0 of the whole step. The loss of a step is the
mean over its examples (all micro-batches, all ranks), so the update does not depend on how the step is
split into processes, micro-batches and accumulation. Dropout is off in both models, as for DPO.
"""

from __future__ import annotations

import math
import sys

import torch

from dialogtrain.data.collate import collate_sft, input_token_count, mismatched_rows
from dialogtrain.data.sampling import eval_micro_batches_of_rank, micro_batches_of_rank
from dialogtrain.dpo import describe, loss_settings, prepare_model  # noqa: F401  (this recipe's too)
from dialogtrain.options import RunOptions
from dialogtrain.train import loop
from dialogtrain.train.distributed import World
from dialogtrain.train.engine import optimizer_step
from dialogtrain.train.forward import batch_sequence_logps
from dialogtrain.train.loop import Run, to_device
from dialogtrain.train.losses import PREFERENCE_LOSSES
from dialogtrain.train.reference import Reference, setup_reference

UNIT = "rated completions"
# rewards/chosen and logps/chosen are the desirable completions' means (TRL's names), /rejected the undesirable
# ones'; margins the difference of the two means; kl the step's reference point z0.
SUMS = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
PROGRESS = ("loss", "kl")
collate = collate_sft  # a rated completion is a conversation row: its ids, only the completion learned
BALANCED = (1.0, 4 / 3)  # the paper's range of desirable weight x count / (undesirable weight x count)


def load_examples(options: RunOptions, tokenizer, world: World) -> tuple[list[dict], list[dict]]:
    """The train (and eval) rated completions: loaded, validated, de-duplicated, encoded (data.prepare); the
    counts, and a note when the desirable and undesirable ones are out of balance, printed once."""
    from dialogtrain.data.prepare import RATINGS, prepare_examples

    train_set, eval_set = prepare_examples(options, RATINGS, tokenizer, world.print)
    note = balance_note(train_set, options.dpo.kto_desirable_weight, options.dpo.kto_undesirable_weight)
    if note:
        world.print(note)
    return train_set, eval_set


def balance_note(examples: list[dict], desirable_weight: float, undesirable_weight: float) -> str | None:
    """A note when w_D n_D / (w_U n_U) is outside the paper's [1, 4/3] (Ethayarajh et al. 2024, sec. 4.2),
    naming the weights that make it 1; None when it is inside."""
    desirable = sum(1 for e in examples if e["desirable"])
    undesirable = len(examples) - desirable
    if not desirable or not undesirable:
        kind = "desirable" if desirable else "undesirable"
        return (f"note: all {len(examples)} rated completions are {kind}; KTO then only pushes them "
                f"{'up' if desirable else 'down'} against the reference point, with nothing to contrast them with")
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if BALANCED[0] <= ratio <= BALANCED[1]:
        return None
    return (f"note: {desirable} desirable and {undesirable} undesirable completions weigh {ratio:.2f} : 1 "
            f"(--kto-desirable-weight {desirable_weight:g} x {desirable} / --kto-undesirable-weight "
            f"{undesirable_weight:g} x {undesirable}); KTO's paper keeps this within [1, 4/3]: "
            f"--kto-undesirable-weight {desirable_weight * desirable / undesirable:.3g} "
            f"(or --kto-desirable-weight {undesirable_weight * undesirable / desirable:.3g}) makes it 1")


def example_length(example: dict) -> int:
    return len(example["input_ids"])


def setup(run: Run) -> tuple[Reference, Reference]:
    """(train reference, eval reference): the live frozen copy (KTO's KL rows change every step)."""
    return setup_reference(run)


def kl_partners(order: list[int]) -> dict[int, int]:
    """Each example's KL partner, whose completion follows its prompt in a KL row: the next in `order`
    (the step's examples), the last's the first. [3, 0, 5] -> {3: 0, 0: 5, 5: 3}."""
    return {i: order[(k + 1) % len(order)] for k, i in enumerate(order)}


@torch.no_grad()
def reference_point_pass(engine, run: Run, reference: Reference, micro_batches: list[list[int]], examples: list[dict],
                         partners: dict[int, int]) -> tuple[float, list[torch.Tensor]]:
    """(this rank's sum over its KL rows of the policy's minus the reference's log-probs, [the reference's
    log-probs (B,) of each micro-batch's examples]). No gradient; one value read back from the device.

    An empty micro-batch (a rank out of eval examples) still runs its forwards (ZeRO-3 gathers are
    collective) on example 0 and counts nothing.
    """
    device, max_length = run.world.device, run.options.data.max_length
    kl_sum, ref_logps = torch.zeros((), dtype=torch.float32, device=device), []
    for micro in micro_batches:
        rows = [examples[i] for i in micro or [0]]
        kl_rows = mismatched_rows(rows, [examples[partners[i]] for i in micro or [0]], max_length)
        ref = reference.logps(micro, to_device(run.collate(rows + kl_rows), device), engine)  # (2B,): rows, KL rows
        policy_kl, _ = batch_sequence_logps(engine, to_device(run.collate(kl_rows), device))  # (B,)
        if micro:
            kl_sum += (policy_kl - ref[len(rows):]).sum()
        ref_logps.append(ref[:len(rows)])
    return float(kl_sum), ref_logps


def score_ratings(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: float,
                  options: RunOptions) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(per-example losses (B,), rewards (B,), summed metrics SUMS) of a micro-batch of rated completions."""
    loss = PREFERENCE_LOSSES[options.dpo.loss]
    losses, rewards = loss.function(logps, ref_logps, desirable, kl, **loss_settings(options))
    undesirable = ~desirable
    sums = torch.stack([losses.detach().sum(), rewards[desirable].sum(), rewards[undesirable].sum(),
                        logps.detach()[desirable].sum(), logps.detach()[undesirable].sum()])
    return losses, rewards, dict(zip(SUMS, sums.tolist(), strict=True))  # one device sync


def means(totals: dict[str, float], examples: int, desirable: int, kl: float) -> dict[str, float]:
    """The step's (or eval set's) metrics from sums over its examples: the loss over all, rewards/chosen and
    logps/chosen over the desirable ones, /rejected over the undesirable ones (a kind absent: left out)."""
    out = {"loss": totals["loss"] / examples, "kl": kl}
    for side, count in (("chosen", desirable), ("rejected", examples - desirable)):
        if count:
            out[f"rewards/{side}"] = totals[f"rewards/{side}"] / count
            out[f"logps/{side}"] = totals[f"logps/{side}"] / count
    if desirable and desirable < examples:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def train_step(engine, run: Run, state: tuple[Reference, Reference], indices: list[int]) -> dict[str, float]:
    """One optimizer step over the global batch `indices` (example indices, identical on every rank): the
    reference point z0 of the step, then each micro-batch's forward and backward. Metrics: means over all its
    examples (all micro-batches, all ranks), kl = z0, and skipped (fp16 skipped the update)."""
    options, world, examples, (reference, _) = run.options, run.world, run.train_set, state
    step_examples = len(indices)  # N_step: all ranks, all micro-batches
    step_desirable = sum(1 for i in indices if examples[i]["desirable"])
    # engine.backward divides by grad-accum and data parallelism averages over ranks: undo both once,
    # so the summed gradient is d(sum of example losses)/N_step.
    backward_scale = options.optim.grad_accum * world.size
    micro_batches = micro_batches_of_rank(indices, run.lengths, world.rank, world.size, options.optim.micro_batch)
    kl_sum, ref_logps = reference_point_pass(engine, run, reference, micro_batches, examples, kl_partners(indices))
    kl = max(0.0, world.sum(kl_sum)[0] / step_examples)  # z0, the same on every rank
    sums, input_tokens, target_tokens, grad_norm = dict.fromkeys(SUMS, 0.0), 0, 0, math.nan
    for k, micro in enumerate(micro_batches):
        batch = to_device(run.collate([examples[i] for i in micro]), world.device)
        logps, n_tokens = batch_sequence_logps(engine, batch)  # (B,) each, fp32
        desirable = torch.tensor([examples[i]["desirable"] for i in micro], device=world.device)
        losses, _, micro_sums = score_ratings(logps, ref_logps[k], desirable, kl, options)
        engine.backward(losses.sum() / step_examples * backward_scale)
        if k == len(micro_batches) - 1:
            grad_norm, applied = optimizer_step(engine)
        else:
            engine.step()
        sums = {name: sums[name] + micro_sums[name] for name in SUMS}
        input_tokens += input_token_count(batch)
        target_tokens += int(n_tokens.sum())
    *totals, input_tokens, target_tokens = world.sum(*sums.values(), input_tokens, target_tokens)
    return {**means(dict(zip(SUMS, totals, strict=True)), step_examples, step_desirable, kl),
            "grad_norm": grad_norm, "input_tokens": input_tokens, "target_tokens": target_tokens, "skipped": not applied}


def ranking_accuracy(rewards: torch.Tensor, desirable: torch.Tensor) -> float | None:
    """The share of (desirable, undesirable) pairs of completions whose rewards are in the right order:
    reward accuracy for unpaired data (None without both kinds). rewards (N,), desirable (N,) bool."""
    good, bad = rewards[desirable], rewards[~desirable]
    if not len(good) or not len(bad):
        return None
    return (good[:, None] > bad[None, :]).double().mean().item()


@torch.no_grad()
def evaluate(engine, run: Run, state: tuple[Reference, Reference]) -> dict[str, float]:
    """The metrics over the whole eval set (its own z0 from KL rows pairing each example with the next),
    all ranks together, prefixed `eval_`; eval_rewards/accuracies is ranking_accuracy over the whole set."""
    world, examples, options, (_, reference) = run.world, run.eval_set, run.options, state
    engine.eval()
    micro_batches = eval_micro_batches_of_rank(len(examples), world.rank, world.size, options.optim.micro_batch)
    kl_sum, ref_logps = reference_point_pass(engine, run, reference, micro_batches, examples,
                                             kl_partners(list(range(len(examples)))))
    kl = max(0.0, world.sum(kl_sum)[0] / len(examples))
    sums, scored = dict.fromkeys(SUMS, 0.0), []
    for k, micro in enumerate(micro_batches):
        batch = to_device(run.collate([examples[i] for i in micro or [0]]), world.device)
        logps, _ = batch_sequence_logps(engine, batch)
        desirable = torch.tensor([examples[i]["desirable"] for i in micro or [0]], device=world.device)
        _, rewards, micro_sums = score_ratings(logps, ref_logps[k], desirable, kl, options)
        if micro:
            sums = {name: sums[name] + micro_sums[name] for name in SUMS}
            scored += zip(micro, rewards.tolist(), strict=True)
    engine.train()
    totals = world.sum(*sums.values())
    scored = sorted(pair for rank_scored in world.gather(scored) for pair in rank_scored)  # (index, reward), all
    desirable = sum(1 for e in examples if e["desirable"])
    metrics = means(dict(zip(SUMS, totals, strict=True)), len(examples), desirable, kl)
    accuracy = ranking_accuracy(torch.tensor([reward for _, reward in scored]),
                                torch.tensor([examples[i]["desirable"] for i, _ in scored]))
    if accuracy is not None:
        metrics["rewards/accuracies"] = accuracy
    return {f"eval_{name}": value for name, value in metrics.items()}


def eval_summary(metrics: dict[str, float]) -> str:
    accuracy = metrics.get("eval_rewards/accuracies")
    ranked = f", desirable above undesirable {accuracy:.3f}" if accuracy is not None else ""
    return f"loss {metrics['eval_loss']:.4f}{ranked}, kl {metrics['eval_kl']:.4f}"


def train(run_json, world: World):
    """The whole KTO run: train.loop with this module as the recipe. Returns the engine."""
    return loop.train(run_json, world, sys.modules[__name__])


if __name__ == "__main__":
    loop.main(sys.modules[__name__], "python -m dialogtrain.kto RUN/run.json")

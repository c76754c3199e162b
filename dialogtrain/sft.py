"""Supervised fine-tuning: the step and the evaluation of the SFT recipe (the loop is train.loop's).

    torchrun ... -m dialogtrain.sft RUN/run.json

Only assistant tokens are learned. The loss of a step is the summed token cross-entropy divided by
the target tokens of the whole step (all micro-batches, all ranks), so the update does not depend on
how the step is split into processes, micro-batches and accumulation.
"""

from __future__ import annotations

import math
import sys

import torch

from dialogtrain.data.collate import collate_sft, input_token_count, target_tokens
from dialogtrain.data.sampling import eval_micro_batches_of_rank, micro_batches_of_rank
from dialogtrain.options import RunOptions
from dialogtrain.train import loop
from dialogtrain.train.distributed import World
from dialogtrain.train.engine import optimizer_step
from dialogtrain.train.forward import batch_sequence_logps, learned_logits
from dialogtrain.train.loop import Run, to_device
from dialogtrain.train.losses import sft_loss
from dialogtrain.train.source_metrics import SourceTotals

UNIT = "examples"
PROGRESS = ("loss",)
collate = collate_sft


def load_examples(options: RunOptions, tokenizer, world: World) -> tuple[list[dict], list[dict]]:
    """The train (and eval) conversations: loaded, validated, de-duplicated, encoded (data.prepare); the
    counts printed once."""
    from dialogtrain.data.prepare import CONVERSATIONS, prepare_examples

    return prepare_examples(options, CONVERSATIONS, tokenizer, world.print)


def example_length(example: dict) -> int:
    return len(example["input_ids"])


def prepare_model(model: torch.nn.Module) -> None:
    """Nothing: SFT trains the model as loaded, dropout included."""


def setup(run: Run) -> None:
    """Nothing beside the engine."""


def describe(options: RunOptions) -> str:
    return ""


def train_step(engine, run: Run, state: None, indices: list[int]) -> dict[str, float]:
    """One optimizer step over the global batch `indices` (example indices, identical on every rank)."""
    options, world, examples = run.options, run.world, run.train_set
    step_targets = sum(target_tokens(examples[i]) for i in indices)  # N_step: all ranks, all micro-batches
    # engine.backward divides by grad-accum and data parallelism averages over ranks: undo both once,
    # so the summed gradient is d(sum of token losses)/N_step.
    backward_scale = options.optim.grad_accum * world.size
    micro_batches = micro_batches_of_rank(indices, run.lengths, world.rank, world.size, options.optim.micro_batch)
    loss, input_tokens, grad_norm, applied = torch.zeros((), device=world.device), 0, math.nan, True
    for k, micro in enumerate(micro_batches):
        batch = to_device(run.collate([examples[i] for i in micro]), world.device)
        # (N, V) logits at the learned positions only, unnamed: freed by the backward, not kept to the next forward
        micro_loss = sft_loss(learned_logits(engine, batch), batch["targets"], step_targets)  # this micro-batch's share
        engine.backward(micro_loss * backward_scale)
        if k == len(micro_batches) - 1:
            grad_norm, applied = optimizer_step(engine)
        else:
            engine.step()
        loss += micro_loss.detach()  # on the device: read once per step, below
        input_tokens += input_token_count(batch)
    loss, input_tokens = world.sum(float(loss), input_tokens)
    return {"loss": loss, "grad_norm": grad_norm, "input_tokens": input_tokens, "target_tokens": step_targets,
            "skipped": not applied}


@torch.no_grad()
def evaluate(engine, run: Run, state: None) -> dict[str, float]:
    """Mean assistant-token loss and perplexity over the whole eval set, all ranks together; with several
    data sources, the loss of each too (eval_loss/NAME)."""
    world, examples = run.world, run.eval_set
    engine.eval()
    nll, tokens, by_source = 0.0, 0, SourceTotals(examples)
    for micro in eval_micro_batches_of_rank(len(examples), world.rank, world.size, run.options.optim.micro_batch):
        # A rank out of examples still runs a forward (ZeRO-3 gathers are collective) and counts nothing.
        batch = to_device(run.collate([examples[i] for i in micro or [0]]), world.device)
        logps, n = batch_sequence_logps(engine, batch)
        if micro:
            nll -= float(logps.sum())
            tokens += int(n.sum())
            if by_source:
                by_source.add(micro, (-logps).tolist(), n.tolist())
    engine.train()
    nll, tokens = world.sum(nll, tokens)
    loss = nll / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), **by_source.means(world, "eval_loss")}


def eval_summary(metrics: dict[str, float]) -> str:
    return f"loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_ppl']:.2f}"


def train(run_json, world: World):
    """The whole SFT run: train.loop with this module as the recipe. Returns the engine."""
    return loop.train(run_json, world, sys.modules[__name__])


if __name__ == "__main__":
    loop.main(sys.modules[__name__], "python -m dialogtrain.sft RUN/run.json")

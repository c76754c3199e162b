"""The facts of each preference loss, read without torch: which --loss names exist (train.losses.PREFERENCE_LOSSES,
the one list of them), whether each needs a reference model and pairs, and which options it reads.

The launcher validates options and builds the flags of `dialogtrain dpo` and `dialogtrain kto` from these facts
without importing torch, which the losses need: the registry's dict literal is read from train/losses.py's source.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The preference commands and whether their loss reads chosen/rejected pairs (dpo) or rated completions (kto).
PREFERENCE_COMMANDS = {"dpo": True, "kto": False}
COMMAND_DEFAULTS = {"kto": {"loss": "kto"}}  # `dialogtrain kto` has no --loss: it trains its one unpaired loss


@dataclass(frozen=True)
class PreferenceLoss:
    """A --loss: its function (train.losses) and the facts the recipes, the reference set-up and the
    option checks read. `function` is None where the launcher read the facts without torch."""

    function: Any
    reference: bool  # reads a reference model's log-probs (a frozen engine or --precompute-ref's table)
    paired: bool  # chosen/rejected pairs (`dialogtrain dpo`); else completions rated good or bad (`dialogtrain kto`)
    options: tuple[str, ...] = ()  # the DPOOptions fields it takes as keyword arguments
    metrics: tuple[str, ...] = ()  # per-example metrics it returns after (losses, chosen rewards, rejected rewards)


@functools.cache
def preference_losses() -> dict[str, PreferenceLoss]:
    """train.losses.PREFERENCE_LOSSES, the one list of --loss names and their facts, read from that module's
    source: the launcher validates options without importing torch, which the losses need."""
    spec = importlib.util.find_spec("dialogtrain.train.losses")
    for node in ast.parse(Path(spec.origin).read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["PREFERENCE_LOSSES"]:
            return {key.value: PreferenceLoss(None, **{k.arg: ast.literal_eval(k.value) for k in value.keywords})
                    for key, value in zip(node.value.keys, node.value.values, strict=True)}
    raise AssertionError("dialogtrain/train/losses.py: no PREFERENCE_LOSSES = {...} literal")


def preference_loss_names(paired: bool | None = None) -> tuple[str, ...]:
    """The --loss names (only the paired or unpaired ones, when `paired` is given)."""
    return tuple(name for name, loss in preference_losses().items() if paired is None or loss.paired == paired)


def options_of_loss(loss: PreferenceLoss) -> set[str]:
    """The DPOOptions fields a --loss reads: its function's own, the reference's when it has one (for pairs
    --precompute-ref too: KTO draws its KL pairs anew each step, so there is no fixed table to precompute),
    and --rpo-alpha for pairs (the chosen NLL added to any pair loss)."""
    names = {"loss", *loss.options}
    if loss.reference:
        names |= {"ref_model", "precompute_ref"} if loss.paired else {"ref_model"}
    if loss.paired:
        names.add("rpo_alpha")
    return names


def preference_fields(command: str) -> set[str]:
    """The DPOOptions fields `dialogtrain COMMAND` takes: those its losses read ({} for sft)."""
    if command not in PREFERENCE_COMMANDS:
        return set()
    names = set().union(*(options_of_loss(loss) for loss in preference_losses().values()
                          if loss.paired == PREFERENCE_COMMANDS[command]))
    return names - ({"loss"} if command in COMMAND_DEFAULTS else set())

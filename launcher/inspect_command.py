"""`dialogtrain inspect`: the click command, taking the data flags of sft and dpo (the report is data.inspection's)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from dialogtrain.options import OptionsError, RunOptions
from launcher.flags import command_fields, field_option, given_values

# The options of sft/dpo that `inspect` takes: what decides which examples training sees and how.
INSPECT_FIELDS = ("model", "chat_template", "trust_remote_code", "data", "eval_data", "eval_split", "max_length",
                  "skip_bad_rows", "keep_duplicates", "keep_overlap", "seed")


def inspect_fields() -> list:
    return [f for f in command_fields("sft") if f.name in INSPECT_FIELDS]


def inspect_options(function: Callable) -> Callable:
    """INSPECT_FIELDS as flags, with the help and checks they have in sft and dpo."""
    for f in reversed(inspect_fields()):
        function = field_option(f)(function)
    return function


@click.command("inspect")
@inspect_options
@click.option("--kind", default="auto", show_default=True, metavar="auto|sft|preference|rating",
              help="conversations (sft), preference pairs (dpo) or rated completions (kto); auto: from the first "
                   "row of --data")
@click.option("--show", type=click.IntRange(min=0), default=1, show_default=True, metavar="K",
              help="examples rendered with their learned tokens marked")
@click.option("--color/--no-color", "colour", default=None,
              help="mark learned tokens in colour instead of [[brackets]]  [default: on a terminal]")
@click.pass_context
def inspect_command(ctx: click.Context, kind: str, show: int, colour: bool | None, **_flags: Any) -> None:
    """What training would see of --data (and --eval-data), before any GPU time: formats and row counts,
    bad rows, duplicates and train/eval overlap, token lengths with the model's tokenizer, what --max-length
    cuts, the share of tokens learned, and rendered examples with the learned tokens marked."""
    values, problems = given_values(ctx, inspect_fields())
    try:
        options = RunOptions.from_flat("sft", {"output": "<inspect>", **values})
    except OptionsError as err:
        raise OptionsError(problems + err.problems) from None
    if problems:
        raise OptionsError(problems)
    from dialogtrain.data.inspection import inspect_data  # imports transformers (and with it torch)

    click.echo(inspect_data(options, kind, show, sys.stdout.isatty() if colour is None else colour))

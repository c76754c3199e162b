"""Run options as click flags and `--config FILE` keys, generated from the option dataclasses.

Every field of dialogtrain.options becomes `--field-name`, so options.py stays the one list of
options. The click options take raw strings (default None) and convert them here, so that every
bad value of a command line is reported together instead of click stopping at the first.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dialogtrain.options import DPO_LOSSES, OFFLOADS, PRECISIONS, SECTIONS, flag

HELP = {
    "model": "Hugging Face model id or local folder to fine-tune (required)",
    "ref_model": "frozen reference model [default: a copy of --model]",
    "trust_remote_code": "run Python code shipped with the model",
    "chat_template": "chat format: model (its own template; none: DialoGPT style), dialogpt (each turn + "
                     "EOS), user-assistant ('user: ...' / 'assistant: ...' lines) or a Jinja template file; "
                     "the exported tokenizer keeps it",
    "data": "training data: a file, a folder of files, or a hub id name[:config][@split] (required)",
    "eval_data": "evaluation data, in the same forms as --data",
    "max_length": "tokens per example; longer conversations lose their oldest turns",
    "skip_bad_rows": "drop invalid rows (and count them) instead of stopping",
    "group_by_length": "put examples of similar length in the same step: ~1.5x the tokens/s (little padding "
                       "computed), but each step sees less varied examples, which can cost learning per step",
    "packing": "run each micro-batch as one row of its examples back to back, each attending only to "
               "itself, so no padding is computed (same losses and gradients as padded rows); "
               "--no-packing pads instead  [default: on]",
    "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "optimizer steps of linear warm-up before the linear decay to 0",
    "grad_clip": "clip the gradient norm to this; 0 disables clipping",
    "micro_batch": "sequences per process per forward pass",
    "grad_accum": "micro-batches accumulated into one optimizer step",
    "precision": "fp32, bf16 (CPU or GPU) or fp16 (GPU only, dynamic loss scaling)",
    "zero": "ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also weights",
    "offload": "move optimizer state (ZeRO 1-3) and weights (ZeRO-3) to CPU RAM",
    "gradient_checkpointing": "recompute each layer's activations in the backward pass instead of keeping "
                              "them: activation memory of about one layer, about a third more compute",
    "epochs": "passes over the training data (--max-steps wins when given)",
    "max_steps": "stop after this many optimizer steps",
    "seed": "seed for shuffling and initialisation",
    "log_every": "write metrics.jsonl every N optimizer steps",
    "eval_every": "evaluate every N optimizer steps; 0: at the end only",
    "save_every": "checkpoint every N optimizer steps; 0: final model only",
    "keep_last": "keep only the K newest checkpoints; 0 keeps all",
    "beta": "DPO beta: how strongly the policy is held near the reference",
    "loss": "DPO loss: sigmoid (DPO), ipo or hinge",
    "label_smoothing": "conservative DPO: assumed probability that a preference is flipped",
    "rpo_alpha": "weight of the chosen responses' NLL added to the DPO loss (RPO); 0 disables",
    "precompute_ref": "compute reference log-probs once before training instead of keeping the "
                      "reference model",
    "output": "run folder: run.json, ds_config.json, command.sh, metrics.jsonl, checkpoints/, final/ "
              "(required)",
    "gpus": "GPU ids (0,1,3), all, or cpu",
    "nproc": "number of processes with --gpus cpu",
    "max_restarts": "after a worker fails, torchrun restarts all workers up to N times; they resume from "
                    "the last checkpoint",
    "ds_config": "start from your own DeepSpeed config JSON (the flags still set the keys they own)",
    "nnodes": "machines in the run: start the same command on each, with its own --node-rank "
              "(torchrun static rendezvous)",
    "master_addr": "address of node 0 that every node reaches (needed with --nnodes above 1)  "
                   "[default: 127.0.0.1 on one node; with --hostfile, the first host's `hostname -I`]",
    "hostfile": "start on the hosts of FILE (`host slots=K` lines) through the deepspeed launcher "
                "(pdsh over ssh) instead of torchrun",
    "resume": "continue from a checkpoint: auto (the latest in --output; alone, --resume means auto) or "
              "a checkpoint folder; data and options must match it",
    "resume_force": "resume although the data or options differ from the checkpoint's",
}
METAVARS = {
    "model": "MODEL", "ref_model": "MODEL", "chat_template": "NAME|FILE", "data": "DATA", "eval_data": "DATA", "output": "RUN",
    "ds_config": "FILE", "gpus": "IDS|all|cpu", "master_addr": "ADDR", "hostfile": "FILE",
    "precision": "|".join(PRECISIONS),
    "offload": "|".join(OFFLOADS), "loss": "|".join(DPO_LOSSES), "zero": "0|1|2|3", "resume": "[auto|PATH]",
}
DPO_ONLY = {"ref_model"}  # outside the dpo section, but meaningless for sft
OPTIONAL_VALUES = {"resume": "auto"}  # `--resume` alone means `--resume auto`


def command_fields(command: str) -> list[dataclasses.Field]:
    """The RunOptions fields `dialogtrain COMMAND` takes: dpo takes all, sft and config no DPO ones."""
    return [f for section, klass in SECTIONS.items() if section != "dpo" or command == "dpo"
            for f in dataclasses.fields(klass) if command == "dpo" or f.name not in DPO_ONLY]


def base_type(f: dataclasses.Field) -> str:
    """'int', 'float', 'bool' or 'str' from an annotation such as 'int | None'."""
    return str(f.type).split("|")[0].strip()


def run_options(command: str) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per field of `command_fields(command)`."""
    def decorate(function: Callable) -> Callable:
        for f in reversed(command_fields(command)):
            function = field_option(f)(function)
        return function

    return decorate


def field_option(f: dataclasses.Field) -> Callable[[Callable], Callable]:
    name = f.name.replace("_", "-")
    no_default = f.default is None or f.default == "" or isinstance(f.default, bool)
    shown = "" if no_default else f"  [default: {f.default}]"
    if base_type(f) == "bool":
        return click.option(f"--{name}/--no-{name}", f.name, default=None, help=HELP[f.name])
    if f.name in OPTIONAL_VALUES:
        return click.option(f"--{name}", f.name, type=str, default=None, is_flag=False,
                            flag_value=OPTIONAL_VALUES[f.name], help=HELP[f.name], metavar=METAVARS[f.name])
    return click.option(f"--{name}", f.name, type=str, default=None, help=HELP[f.name] + shown,
                        metavar=METAVARS.get(f.name, {"int": "N", "float": "X"}.get(base_type(f), "TEXT")))


def convert_value(f: dataclasses.Field, value: Any) -> Any:
    """A command-line string or config-file value, as the field's type. Raises ValueError(why).

    Strings become int/float where the field needs one (YAML reads `5e-5` as a string); numbers
    and lists of numbers become strings where it needs one (`gpus: [0, 1]` -> "0,1"). Anything
    else passes through for RunOptions.from_flat to type-check.
    """
    kind = base_type(f)
    if isinstance(value, str) and kind in ("int", "float"):
        try:
            return int(value) if kind == "int" else float(value)
        except ValueError:
            needed = "an integer" if kind == "int" else "a number"
            raise ValueError(f"must be {needed}, got {value!r}") from None
    if kind == "str" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if kind == "str" and isinstance(value, list) and all(isinstance(v, (int, str)) for v in value):
        return ",".join(str(v) for v in value)
    return value


def given_values(ctx: click.Context, fields: list[dataclasses.Field]) -> tuple[dict[str, Any], list[str]]:
    """(values, problems) of the run options the user typed on the command line, converted."""
    values, problems = {}, []
    for f in fields:
        if ctx.get_parameter_source(f.name) is not click.core.ParameterSource.COMMANDLINE:
            continue
        try:
            values[f.name] = convert_value(f, ctx.params[f.name])
        except ValueError as err:
            problems.append(f"{flag(f.name)} {err}")
    return values, problems


def read_config_file(path: str, command: str) -> tuple[dict[str, Any], list[str]]:
    """(values, problems) from a YAML or JSON mapping of flag names (`micro-batch` or `micro_batch`)."""
    import yaml  # only when a --config is given

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        return {}, [f"--config {path}: cannot read it ({err.strerror})"]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        why = getattr(err, "problem", None) or err
        return {}, [f"--config {path}: not valid YAML or JSON ({where}{why})"]
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        return {}, [f"--config {path}: expected a mapping of option names to values, "
                    f"got {type(raw).__name__}"]
    known = {f.name: f for f in command_fields(command)}
    values, problems = {}, []
    for key, value in raw.items():
        name = str(key).removeprefix("--").replace("-", "_")
        if name not in known:
            problems.append(f"--config {path}: {unknown_option_message(str(key), name, command)}")
            continue
        try:
            values[name] = convert_value(known[name], value)
        except ValueError as err:
            problems.append(f"--config {path}: {key} {err}")
    return values, problems


def unknown_option_message(typed: str, name: str, command: str) -> str:
    """"unknown key 'lrr' (did you mean lr?)", or why a real option does not apply to this command."""
    if any(name == f.name for f in command_fields("dpo")):
        return (f"unknown key {typed!r}: {flag(name)} is a dpo option, "
                f"`dialogtrain {command}` does not take it")
    close = difflib.get_close_matches(name, [f.name for f in command_fields(command)], n=1)
    hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
    return f"unknown key {typed!r}{hint}"


def unknown_argument_problems(args: list[str], command: str, known_flags: list[str]) -> list[str]:
    """Problems for command-line words click did not recognise; a word after an unknown flag is its value."""
    problems, after_unknown_flag = [], False
    for arg in args:
        if arg.startswith("-"):
            typed = arg.split("=", 1)[0]
            close = difflib.get_close_matches(typed, known_flags, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            if any(typed == flag(f.name) for f in command_fields("dpo")):
                hint = f" ({typed} is a dpo option, `dialogtrain {command}` does not take it)"
            problems.append(f"unknown option {typed}{hint}")
            after_unknown_flag = "=" not in arg
        elif not after_unknown_flag:
            problems.append(f"unexpected argument {arg!r}")
        else:
            after_unknown_flag = False
    return problems

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

from dialogtrain.loss_facts import PREFERENCE_COMMANDS, preference_fields
from dialogtrain.options import SECTIONS, flag

OPTIONAL_VALUES = {"resume": "auto"}  # `--resume` alone means `--resume auto`


def command_fields(command: str) -> list[dataclasses.Field]:
    """The RunOptions fields `dialogtrain COMMAND` takes: of the DPO section, those the losses of dpo (pairs) or
    kto (rated completions) read (loss_facts.preference_fields), none for sft and config."""
    return [f for section, klass in SECTIONS.items() for f in dataclasses.fields(klass)
            if section != "dpo" or f.name in preference_fields(command)]


def taken_by(name: str, command: str) -> str | None:
    """The other preference command that takes option `name` (a field name), if `command` does not."""
    return next((other for other in PREFERENCE_COMMANDS if other != command and name in preference_fields(other)
                 and name not in preference_fields(command)), None)


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
    """The click option of a run-options field: its help and metavar are the field's (options.option)."""
    name = f.name.replace("_", "-")
    help_text, metavar = f.metadata["help"], f.metadata["metavar"]
    no_default = f.default is None or f.default == "" or isinstance(f.default, bool)
    shown = "" if no_default else f"  [default: {f.default}]"
    if base_type(f) == "bool":
        return click.option(f"--{name}/--no-{name}", f.name, default=None, help=help_text)
    if f.name in OPTIONAL_VALUES:
        return click.option(f"--{name}", f.name, type=str, default=None, is_flag=False,
                            flag_value=OPTIONAL_VALUES[f.name], help=help_text, metavar=metavar)
    return click.option(f"--{name}", f.name, type=str, default=None, help=help_text + shown,
                        metavar=metavar or {"int": "N", "float": "X"}.get(base_type(f), "TEXT"))


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
    if taken_by(name, command):
        return (f"unknown key {typed!r}: {flag(name)} is a {taken_by(name, command)} option, "
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
            other = taken_by(typed.removeprefix("--").replace("-", "_"), command)
            if other:
                hint = f" ({typed} is a {other} option, `dialogtrain {command}` does not take it)"
            problems.append(f"unknown option {typed}{hint}")
            after_unknown_flag = "=" not in arg
        elif not after_unknown_flag:
            problems.append(f"unexpected argument {arg!r}")
        else:
            after_unknown_flag = False
    return problems

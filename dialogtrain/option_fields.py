"""How a run option is declared and checked: the field with its help, its flag name, its type check, and
the one error that lists every problem of a command line. Torch-free."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from dialogtrain.errors import UserError


class OptionsError(UserError):
    """Every problem of one command line, each naming its flag."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n  ".join(["invalid options:", *problems]))


def flag(name: str) -> str:
    """Field name -> the flag a user types: `micro_batch` -> `--micro-batch`."""
    return "--" + name.replace("_", "-")


def option(default: Any, help: str, metavar: str | None = None) -> Any:
    """A field of the run options with its command-line help (and metavar) beside it; launcher.flags
    turns each field into `--field-name`."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


def type_problem(f: dataclasses.Field, value: Any) -> str | None:
    """Why `value` cannot fill field `f`, or None. Accepts ints for floats and None for optional fields."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        return None if "None" in kind else f"{flag(f.name)} needs a value"
    if kind.startswith("bool"):
        ok = isinstance(value, bool)
    elif kind.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    return None if ok else f"{flag(f.name)} must be {kind.split(' ')[0]}, got {value!r}"

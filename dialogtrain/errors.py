"""Errors a user can cause and fix. They end a command with exit code 2 and one clear message."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A bad flag, file, row or model path: reported as `error: <message>`, exit code 2, no traceback."""

    exit_code = 2


class TrainingError(UserError):
    """Training cannot go on (NaN/inf loss, a checkpoint that cannot be written): exit 3, nothing that
    was saved before is touched."""

    exit_code = 3


def exit_on_user_error(main: Callable[[], object]) -> None:
    """Run `main`; turn a UserError into its message on stderr and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

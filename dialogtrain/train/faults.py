"""Fault injection for the tests: kill a worker or fail a save at a chosen moment, through one hook.

    DIALOGTRAIN_FAULT=KIND:STEP[:RANK][,...]

on the first attempt only (a worker restarted by torchrun runs clean), rank 0 unless RANK is given:
    kill-at-step:S      SIGKILL right after optimizer step S (before its checkpoint)
    kill-during-save:S  SIGKILL after the first file DeepSpeed writes for the checkpoint of step S
    fail-save:S         writing the checkpoint of step S fails as on a full disk

Production code calls `fault_point(moment, step, rank)` at the two moments that can fail ("step done",
"file written"); with DIALOGTRAIN_FAULT unset it returns at once.
"""

from __future__ import annotations

import errno
import os
import signal

from dialogtrain.train.resume import restart_count

FAULT_ENV = "DIALOGTRAIN_FAULT"
STEP_DONE, FILE_WRITTEN = "step done", "file written"
# moment -> the faults that can strike there, and what each does
ACTIONS = {
    STEP_DONE: {"kill-at-step": "kill"},
    FILE_WRITTEN: {"kill-during-save": "kill", "fail-save": "fail"},
}


def requested(kind: str, step: int, rank: int) -> bool:
    """Whether DIALOGTRAIN_FAULT asks for `kind` at `step` on `rank`; never in a restarted worker."""
    if restart_count() > 0:
        return False
    for entry in os.environ.get(FAULT_ENV, "").split(","):
        parts = entry.strip().split(":")
        if len(parts) in (2, 3) and parts[0] == kind and parts[1] == str(step) \
                and (parts[2] if len(parts) == 3 else "0") == str(rank):
            return True
    return False


def fault_point(moment: str, step: int, rank: int, path: str = "") -> None:
    """Strike the fault DIALOGTRAIN_FAULT asks for at this moment, if any: SIGKILL this process, or raise
    the OSError a full disk raises for `path`."""
    if FAULT_ENV not in os.environ:
        return
    for kind, action in ACTIONS[moment].items():
        if requested(kind, step, rank):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {FAULT_ENV})", path)

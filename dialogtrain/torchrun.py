"""torchrun, with a failed worker reported in one line and its own exit code.

    python -m dialogtrain.torchrun [torchrun arguments] -m dialogtrain.sft RUN/run.json

Plain torchrun answers any worker failure with exit code 1 and a page of its own traceback
(ChildFailedError), burying the worker's message (a bad data row, a NaN loss) that was printed
just above it. This wrapper runs the same `torch.distributed.run` and, when a worker fails, says
which rank failed and exits with that worker's code: 2 for a user error, 3 for a training error.
"""

from __future__ import annotations

import logging
import signal
import sys


def exit_code_of(exitcode: int) -> int:
    """A worker's exit code as a shell reports it: 128 + N when signal N killed it."""
    return 128 - exitcode if exitcode < 0 else exitcode


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's agent logs each failure with its own formatting; the line below replaces it.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = exit_code_of(failure.exitcode)
        how = (f"was killed by signal {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
               else f"exited with code {code}")
        print(f"error: rank {rank} (local rank {failure.local_rank}) {how}; its output is above",
              file=sys.stderr, flush=True)
        return code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

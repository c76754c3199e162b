"""The launch command of a run (torchrun on one node), its environment, and running it."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from dialogtrain.options import RunOptions
from launcher.devices import Devices

WORKER_MODULES = {"sft": "dialogtrain.sft", "dpo": "dialogtrain.dpo"}
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def torchrun_prefix() -> list[str]:
    """torchrun of this Python environment, through dialogtrain.torchrun: the same arguments, but a
    failed worker ends the launch with that worker's exit code and one line, not torchrun's traceback."""
    return [sys.executable, "-m", "dialogtrain.torchrun"]


def launch_argv(command: str, run_json: Path, nproc: int, port: int, max_restarts: int = 0) -> list[str]:
    """torchrun with static rendezvous on this machine, starting `nproc` workers of `command`."""
    return [*torchrun_prefix(), "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", str(max_restarts),
            "-m", WORKER_MODULES[command], str(run_json)]


def launch_environment(devices: Devices, environ: Mapping[str, str],
                       cpu_count: int | None = None) -> dict[str, str]:
    """The variables the launch sets on top of the current environment.

    GPUs: CUDA_VISIBLE_DEVICES. CPU: no visible GPU, DeepSpeed's CPU accelerator, and the cores
    split between the processes (the user's OMP_NUM_THREADS wins) so they do not oversubscribe.
    """
    if devices.kind == "cuda":
        env = {"CUDA_VISIBLE_DEVICES": devices.cuda_visible_devices}
    else:
        cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
        threads = environ.get("OMP_NUM_THREADS") or str(max(1, cores // devices.nproc))
        env = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": threads}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command_script(argv: list[str], env: Mapping[str, str], cwd: Path, command: str) -> str:
    """RUN/command.sh: the exact launch, runnable again from anywhere."""
    assignments = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
    return (f"#!/usr/bin/env bash\n"
            f"# The launch command `dialogtrain {command}` ran; run this file to start the same run again.\n"
            f"set -euo pipefail\n"
            f"cd {shlex.quote(str(cwd))}\n"
            f"{assignments} exec {shlex.join(argv)}\n")


def free_port() -> int:
    """A TCP port that was free a moment ago, for torchrun's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def batch_arithmetic(options: RunOptions) -> str:
    processes = "process" if options.world_size == 1 else "processes"
    return (f"global batch {options.global_batch} = micro-batch {options.optim.micro_batch} x "
            f"grad-accum {options.optim.grad_accum} x {options.world_size} {processes}")


def run_forwarding_signals(argv: list[str], env: Mapping[str, str]) -> int:
    """Run `argv` with stdio inherited and `env` added; returns its exit code (128 + N if killed by signal N).

    The child gets its own process group, so a Ctrl-C reaches torchrun once, from us, and torchrun
    stops its workers itself; SIGTERM and SIGHUP (a scheduler, a closed terminal) are passed on too.
    """
    own_group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    child = subprocess.Popen(argv, env={**os.environ, **env}, **own_group)
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {sig: signal.signal(sig, lambda number, _frame: child.send_signal(number))
                for sig in FORWARDED_SIGNALS} if in_main_thread else {}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code

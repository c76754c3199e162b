"""The launch command of a run, its environment, and running it.

Two ways to start the workers:
- torchrun (through dialogtrain.torchrun) with static rendezvous: one node, or `--nnodes N` nodes each
  running the same `dialogtrain` command with its own `--node-rank`;
- `--hostfile FILE`: DeepSpeed's runner, which reaches every host with pdsh over ssh and starts
  `deepspeed.launcher.launch` there, exporting the variables of RUN/deepspeed_env first.

Where DeepSpeed 0.19.8 finds those variables: deepspeed/launcher/runner.py reads `.deepspeed_env` from
the home folder and from the folder it runs in, KEY=VALUE per line; DS_ENV_FILE, read when the runner
is imported, replaces the name, and an absolute path replaces both places (os.path.join drops the
folder). The runner exports them with `export KEY=VALUE;` in the pdsh command, after the variables of
its own environment whose names start with PYTHON, MLFLOW, MV2 or UCX (and NCCL on CUDA).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dialogtrain.options import RunOptions
from launcher.devices import Devices

WORKER_MODULES = {"sft": "dialogtrain.sft", "dpo": "dialogtrain.dpo", "kto": "dialogtrain.kto"}
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Every node must use the same port, so with several nodes it cannot be a free port found on one of them:
# torchrun's and DeepSpeed's own default.
DEFAULT_MASTER_PORT = 29500
NODE_RANK_VARIABLE = "NODE_RANK"  # command.sh of a multi-node run: the one thing that differs per node
WORKER_ENV = "deepspeed_env"
# Set on this host and needed the same way by the workers on every host. The deepspeed runner itself
# passes on PYTHON* (PYTHONPATH gets the launch folder in front) and what ~/.deepspeed_env lists.
CARRIED_VARIABLES = ("PATH", "LD_LIBRARY_PATH", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                     "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR")
CARRIED_PREFIXES = ("DIALOGTRAIN_",)


@dataclass(frozen=True)
class Launch:
    """Starting a run: the command, the variables it adds to this environment, RUN/command.sh, and with
    --hostfile the text of RUN/deepspeed_env (None otherwise)."""

    argv: list[str]
    env: dict[str, str]
    script: str
    worker_env: str | None = None


def plan_launch(command: str, options: RunOptions, devices: Devices, run_dir: Path, node_rank: int | None,
                master_port: int | None, environ: Mapping[str, str] | None = None) -> Launch:
    """The Launch of a validated run whose folder is `run_dir` (absolute)."""
    environ = os.environ if environ is None else environ
    launch = options.launch
    several = launch.nnodes > 1 or bool(launch.hostfile)
    port = master_port or (DEFAULT_MASTER_PORT if several else free_port())
    env = launch_environment(devices, environ, offload=options.optim.offload != "none")
    if launch.hostfile:
        worker_env = deepspeed_env(env, environ, Path.home(), Path.cwd())
        env = {**env, "DS_ENV_FILE": str(run_dir / WORKER_ENV)}
        argv = deepspeed_argv(command, run_dir / "run.json", launch.hostfile, port, launch.master_addr)
        return Launch(argv, env, command_script(argv, env, Path.cwd(), command), worker_env)
    argv = launch_argv(command, run_dir / "run.json", devices.nproc, port, launch.max_restarts,
                       nnodes=launch.nnodes, node_rank=node_rank or 0, master_addr=launch.master_addr or "127.0.0.1")
    return Launch(argv, env, command_script(argv, env, Path.cwd(), command, launch.nnodes))


def node_rank_problems(node_rank: int | None, nnodes: object, hostfile: object) -> list[str]:
    """--node-rank, a flag of the launch only (run.json is the same on every node): needed with several
    nodes, below --nnodes, and meaningless with --hostfile."""
    if hostfile:
        return [] if node_rank is None else [
            "--node-rank with --hostfile: the deepspeed launcher numbers the hosts in the order of the file"]
    if not isinstance(nnodes, int) or nnodes < 1:
        return []  # --nnodes itself is reported
    if nnodes > 1 and node_rank is None:
        others = "1 on the other" if nnodes == 2 else f"1 to {nnodes - 1} on the others"
        return [f"--nnodes {nnodes} needs --node-rank: 0 on the node at --master-addr, {others}"]
    if node_rank is not None and node_rank >= nnodes:
        return [f"--node-rank {node_rank} must be below --nnodes {nnodes}"]
    return []


def torchrun_prefix() -> list[str]:
    """torchrun of this Python environment, through dialogtrain.torchrun: the same arguments, but a
    failed worker ends the launch with that worker's exit code and one line, not torchrun's traceback."""
    return [sys.executable, "-m", "dialogtrain.torchrun"]


def launch_argv(command: str, run_json: Path, nproc: int, port: int, max_restarts: int = 0, *, nnodes: int = 1,
                node_rank: int = 0, master_addr: str = "127.0.0.1") -> list[str]:
    """torchrun with static rendezvous: `nproc` workers of `command` here, node `node_rank` of `nnodes`.

    Node 0 hosts the rendezvous store at master_addr:port; every node's workers wait there for all
    nnodes x nproc of them, and ranks are numbered node by node.
    """
    return [*torchrun_prefix(), "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--nproc-per-node",
            str(nproc), "--master-addr", master_addr, "--master-port", str(port), "--max-restarts",
            str(max_restarts), "-m", WORKER_MODULES[command], str(run_json)]


def deepspeed_argv(command: str, run_json: Path, hostfile: str, port: int, master_addr: str | None = None) -> list[str]:
    """DeepSpeed's runner over pdsh: on each host of `hostfile`, `slots` workers of `command`.

    --force_multi: a hostfile naming one host still runs there, over ssh, not here. --module
    --no_local_rank: the worker is `python -m dialogtrain.sft RUN/run.json`, as under torchrun. Without
    --master-addr, DeepSpeed asks the first host for `hostname -I`. (Not --venv_script: it shifts the
    words DeepSpeed's Ctrl-C handler builds its `pkill -f` pattern from, so the hosts' workers survive.)
    """
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(Path(hostfile).resolve()),
            "--launcher", "pdsh", "--force_multi", "--master_port", str(port)]
    if master_addr:
        argv += ["--master_addr", master_addr]
    return argv + ["--module", "--no_local_rank", WORKER_MODULES[command], str(run_json)]


def launch_environment(devices: Devices, environ: Mapping[str, str], cpu_count: int | None = None,
                       offload: bool = False) -> dict[str, str]:
    """The variables the launch sets on top of the current environment.

    GPUs: CUDA_DEVICE_ORDER=PCI_BUS_ID, so CUDA numbers the GPUs as nvidia-smi does (its default puts the
    fastest first), which `--gpus` ids and CUDA_VISIBLE_DEVICES then mean; CUDA_VISIBLE_DEVICES; and with
    --offload, the node's cores split between its processes for DeepSpeed's CPU Adam (torchrun would give
    each one thread). CPU: no visible GPU, DeepSpeed's CPU accelerator, and the cores split between the
    processes of a node so they do not oversubscribe. The user's OMP_NUM_THREADS and CUDA_DEVICE_ORDER win.
    """
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    threads = environ.get("OMP_NUM_THREADS") or str(max(1, cores // devices.nproc))
    if devices.kind == "cuda":
        env = {"CUDA_DEVICE_ORDER": environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID")}
        if not devices.hosts:
            env["CUDA_VISIBLE_DEVICES"] = devices.cuda_visible_devices
        if offload:
            env["OMP_NUM_THREADS"] = threads
    else:
        env = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": threads}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def deepspeed_env(env: Mapping[str, str], environ: Mapping[str, str], home: Path, cwd: Path) -> str:
    """RUN/deepspeed_env, the DS_ENV_FILE of a --hostfile launch: KEY=VALUE lines exported on every host.

    First the launch variables (DS_ACCELERATOR, OMP_NUM_THREADS...) and CARRIED_VARIABLES as set here,
    so a worker on another host finds the same tools (PATH: ninja for DeepSpeed's op builds), caches
    and offline settings; not CUDA_VISIBLE_DEVICES, which deepspeed.launcher.launch sets on each host
    to that host's slots. Then the lines of the user's own .deepspeed_env files, which DS_ENV_FILE
    hides from DeepSpeed, so that they still apply and win. DeepSpeed takes every line as KEY=VALUE
    (a blank or comment line stops it), so there are no others; nor secrets such as HF_TOKEN from
    this environment (put those in ~/.deepspeed_env, or log in on the hosts).
    """
    carried = {name: value for name, value in environ.items()
               if name in CARRIED_VARIABLES or name.startswith(CARRIED_PREFIXES)}
    ours = {**dict(sorted(carried.items())), **{k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}}
    lines = [f"{name}={value}" for name, value in ours.items() if "\n" not in value]
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    for path in dict.fromkeys([home / name, cwd / name]):  # DeepSpeed's own search, in its order
        if path.is_file():
            lines += [line.strip() for line in path.read_text().splitlines()
                      if "=" in line and not line.lstrip().startswith("#")]
    return "\n".join(lines) + "\n"


def write_deepspeed_env(run_dir: Path, text: str) -> Path:
    """RUN/deepspeed_env, readable by its owner only: it may copy lines of the user's ~/.deepspeed_env."""
    path = run_dir / WORKER_ENV
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)
    return path


def command_script(argv: list[str], env: Mapping[str, str], cwd: Path, command: str, nnodes: int = 1) -> str:
    """RUN/command.sh: the exact launch, runnable again from anywhere.

    With several nodes it is the same file on every node (each node writes it, possibly into one shared
    folder): the node rank comes from $NODE_RANK, which the script insists on.
    """
    assignments = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
    lines = ["#!/usr/bin/env bash",
             f"# The launch command `dialogtrain {command}` ran; run this file to start the same run again.",
             "set -euo pipefail"]
    words = [shlex.quote(word) for word in argv]
    if nnodes > 1:
        words[argv.index("--node-rank") + 1] = f'"${NODE_RANK_VARIABLE}"'
        lines += [f"# Start it on each of the {nnodes} nodes with {NODE_RANK_VARIABLE}=0 (the --master-addr node) "
                  f"to {nnodes - 1}.",
                  f': "${{{NODE_RANK_VARIABLE}:?set {NODE_RANK_VARIABLE} to the rank of this node, 0 to {nnodes - 1}}}"']
    lines += [f"cd {shlex.quote(str(cwd))}", f"{assignments} exec {' '.join(words)}"]
    return "\n".join(lines) + "\n"


def shell_command(argv: list[str], env: Mapping[str, str]) -> str:
    """The launch as one shell line with its variables, as shown to the user."""
    return " ".join([*(f"{key}={shlex.quote(value)}" for key, value in env.items()), shlex.join(argv)])


def free_port() -> int:
    """A TCP port that was free a moment ago, for torchrun's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def batch_arithmetic(options: RunOptions) -> str:
    """`global batch 16 = micro-batch 2 x grad-accum 2 x 4 processes (2 nodes x 2)`."""
    processes = "process" if options.world_size == 1 else "processes"
    where = ""
    if options.launch.hostfile:
        where = " (the slots of --hostfile)"
    elif options.launch.nnodes > 1:
        where = f" ({options.launch.nnodes} nodes x {options.world_size // options.launch.nnodes})"
    return (f"global batch {options.global_batch} = micro-batch {options.optim.micro_batch} x "
            f"grad-accum {options.optim.grad_accum} x {options.world_size} {processes}{where}")


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


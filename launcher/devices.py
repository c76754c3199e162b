"""Which devices and hosts a run uses (`--gpus 0,1,3 | all | cpu`, `--nproc N`, `--nnodes N`, `--hostfile
FILE`), decided without importing torch."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dialogtrain.errors import UserError

FAKE_GPUS_ENV = "DIALOGTRAIN_FAKE_GPUS"  # tests: pretend this many GPUs exist, skip nvidia-smi
FAKE_CAPABILITY_ENV = "DIALOGTRAIN_FAKE_GPU_CAPABILITY"  # tests: their compute capability, "8.0" unless given
HOSTFILE_LINE = re.compile(r"(\S+)\s+slots=(\d+)")  # `worker-1 slots=8`, DeepSpeed's (and MPI's) format


@dataclass(frozen=True)
class Devices:
    """Where the processes of a run go.

    kind: "cuda" or "cpu". ids: the GPU numbers from `--gpus`, counted among the visible GPUs
    (empty on the CPU). nproc: processes to start (one per GPU id, or `--nproc` on the CPU).
    cuda_visible_devices: the value for CUDA_VISIBLE_DEVICES ("" on the CPU). notice: one line
    to show the user when their request was changed (no GPU, so the CPU), else None.
    hosts: (host, slots) from `--hostfile`, in its order; then nproc is the largest slots (the
    busiest host, for splitting CPU threads) and each host's slots pick its GPUs 0..slots-1.
    """

    kind: str
    ids: list[int]
    nproc: int
    notice: str | None = None
    cuda_visible_devices: str = ""
    hosts: tuple[tuple[str, int], ...] = ()

    def world_size(self, nnodes: int = 1) -> int:
        """Processes in the whole run: the slots of every host, or nproc on each of `nnodes` nodes."""
        return sum(slots for _, slots in self.hosts) if self.hosts else self.nproc * nnodes


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """Names of the GPUs a process started now would see, in the order `--gpus` numbers them.

    DIALOGTRAIN_FAKE_GPUS=N gives "0".."N-1". Otherwise `nvidia-smi -L` counts them (none when it
    is missing or fails); an existing CUDA_VISIBLE_DEVICES narrows and renumbers them, as CUDA does.
    """
    environ = os.environ if environ is None else environ
    fake = environ.get(FAKE_GPUS_ENV)
    if fake is not None:
        if not fake.strip().isdigit():
            raise UserError(f"{FAKE_GPUS_ENV}={fake!r}: expected a number of GPUs")
        return [str(i) for i in range(int(fake))]
    count = count_nvidia_smi_gpus()
    if count == 0:
        return []
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(count)]
    return [name.strip() for name in visible.split(",") if name.strip() and name.strip() != "-1"]


def count_nvidia_smi_gpus() -> int:
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20,
                                 check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    if listing.returncode != 0:
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def gpu_capabilities(devices: Devices, environ: Mapping[str, str] | None = None) -> list[tuple[int, int]] | None:
    """The compute capability (major, minor) of each GPU the run uses on this node, from nvidia-smi; None for
    a CPU run, the hosts of a --hostfile (other machines) or GPUs nvidia-smi does not describe here."""
    environ = os.environ if environ is None else environ
    if devices.kind != "cuda" or devices.hosts or not devices.cuda_visible_devices:
        return None
    if environ.get(FAKE_GPUS_ENV) is not None:
        major, _, minor = environ.get(FAKE_CAPABILITY_ENV, "8.0").partition(".")
        return [(int(major), int(minor or 0))] * devices.nproc
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=index,compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    by_index = {}
    for line in listing.stdout.splitlines():
        index, _, capability = (part.strip() for part in line.partition(","))
        major, _, minor = capability.partition(".")
        if index.isdigit() and major.isdigit() and minor.isdigit():
            by_index[index] = (int(major), int(minor))
    wanted = devices.cuda_visible_devices.split(",")
    return [by_index[i] for i in wanted] if listing.returncode == 0 and all(i in by_index for i in wanted) else None


def parse_gpu_ids(gpus: str) -> list[int]:
    """"0,1,3" -> [0, 1, 3]; raises UserError naming --gpus for anything else."""
    parts = [part.strip() for part in gpus.split(",")]
    if not all(part.isdigit() for part in parts):
        raise UserError(f"--gpus {gpus!r}: expected GPU ids like 0,1,3, or all, or cpu")
    ids = [int(part) for part in parts]
    if len(set(ids)) != len(ids):
        raise UserError(f"--gpus {gpus!r}: an id appears twice")
    return ids


def resolve_devices(gpus: str, nproc: int = 1, available: list[str] | None = None,
                    dry_run: bool = False) -> Devices:
    """Decide devices and process count from `--gpus` and `--nproc`.

    `available` is what `visible_gpus()` returns (looked up when None). Rules:
    - `cpu`: `nproc` CPU processes.
    - `all`: one process per GPU; with no GPU, `nproc` CPU processes and a notice.
    - ids: one process per id; every id must exist. A single id on a machine without any GPU
      falls back to one CPU process with a notice; several ids there are an error, except for a
      `dry_run` (a login node preparing a launch): then the GPU command is shown, with a notice.
    `--nproc` above 1 only makes sense on the CPU; with GPUs it must equal the number of ids.
    Raises UserError naming the flag.
    """
    spec = gpus.strip().lower()
    if spec == "cpu":
        return Devices("cpu", [], nproc)
    available = visible_gpus() if available is None else available
    if spec == "all":
        if not available:
            return Devices("cpu", [], nproc,
                           notice="no GPU found (nvidia-smi lists none): running on the CPU")
        return _on_gpus(list(range(len(available))), nproc, available, gpus)
    ids = parse_gpu_ids(gpus)
    if not available:
        if len(ids) == 1:
            return Devices("cpu", [], nproc,
                           notice=f"--gpus {gpus}: no GPU found (nvidia-smi lists none): running on the CPU")
        if dry_run:
            return Devices("cuda", ids, len(ids), cuda_visible_devices=",".join(map(str, ids)),
                           notice=f"--gpus {gpus}: no GPU here to check these ids against (nvidia-smi lists none); "
                                  f"the command is shown as it runs on a machine that has them")
        raise UserError(f"--gpus {gpus}: no GPU found (nvidia-smi lists none); "
                        f"use --gpus cpu --nproc {len(ids)} to run {len(ids)} processes on the CPU")
    missing = [i for i in ids if i >= len(available)]
    if missing:
        raise UserError(f"--gpus {gpus}: no GPU {','.join(map(str, missing))} "
                        f"(this machine shows {len(available)}: {_id_range(len(available))})")
    return _on_gpus(ids, nproc, available, gpus)


def _on_gpus(ids: list[int], nproc: int, available: list[str], gpus: str) -> Devices:
    if nproc > 1 and nproc != len(ids):
        raise UserError(f"--nproc {nproc} is for --gpus cpu; on GPUs one process runs per id "
                        f"(--gpus {gpus} starts {len(ids)})")
    return Devices("cuda", ids, len(ids), cuda_visible_devices=",".join(available[i] for i in ids))


def _id_range(count: int) -> str:
    return "0" if count == 1 else f"0-{count - 1}"


def read_hostfile(path: str) -> tuple[list[tuple[str, int]], list[str]]:
    """((host, slots) in file order, problems) of a hostfile; every problem names --hostfile and the line.

    Lines are `host slots=K` (K >= 1); blank lines and `#` comments are skipped. A host listed twice,
    a line of another shape and a file without hosts are problems, as DeepSpeed would refuse them later.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return [], [f"--hostfile {path}: no such file"]
    except (OSError, UnicodeDecodeError) as err:
        return [], [f"--hostfile {path}: cannot read it ({getattr(err, 'strerror', None) or err})"]
    hosts, seen, problems = [], {}, []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = HOSTFILE_LINE.fullmatch(line)
        if not match:
            problems.append(f"--hostfile {path} line {number}: expected 'host slots=K', got {line!r}")
        elif int(match.group(2)) < 1:
            problems.append(f"--hostfile {path} line {number}: slots must be >= 1, got {match.group(2)}")
        elif match.group(1) in seen:
            problems.append(f"--hostfile {path} line {number}: host {match.group(1)} is already on line "
                            f"{seen[match.group(1)]}")
        else:
            seen[match.group(1)] = number
            hosts.append((match.group(1), int(match.group(2))))
    if not hosts and not problems:
        problems.append(f"--hostfile {path}: no hosts (expected lines like 'worker-1 slots=8')")
    return hosts, problems


def resolve_hosts(gpus: str, nproc: int, hosts: list[tuple[str, int]]) -> Devices:
    """Devices of a `--hostfile` run: `--gpus all` (each host's GPUs 0..slots-1) or `--gpus cpu` (slots
    CPU processes per host). The hosts are other machines, so nothing is looked up here. Raises
    UserError naming the flag for GPU ids or `--nproc`, which the slots decide instead."""
    spec = gpus.strip().lower()
    if spec not in ("all", "cpu"):
        raise UserError(f"--gpus {gpus} with --hostfile: the slots of each host pick its GPUs (slots=K: GPUs "
                        f"0..K-1); use --gpus all, or --gpus cpu for CPU processes")
    if nproc > 1:
        raise UserError(f"--nproc {nproc} with --hostfile: slots=K in the hostfile sets the processes of each host")
    busiest = max(slots for _, slots in hosts)
    return Devices("cuda" if spec == "all" else "cpu", [], busiest, hosts=tuple(hosts))


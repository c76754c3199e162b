"""Process-group set-up and rank-aware output, so the training loops never test `rank == 0`."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from dialogtrain.errors import UserError

T = TypeVar("T")
FAIL_RANK_ENV = "DIALOGTRAIN_FAIL_RANK"  # tests: this rank raises once the process group is formed


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        """print() on rank 0 only, flushed, to stderr so piped stdout stays clean."""
        if self.is_main:
            print(*args, **kwargs, file=sys.stderr, flush=True)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def from_main(self, compute: Callable[[], T]) -> T:
        """`compute()` on rank 0, its result (or the UserError it raised) handed to every rank: for work
        that reads files once, such as hashing a checkpoint, where every rank must get the same answer."""
        if self.size == 1:
            return compute()
        box: list = [None]
        if self.is_main:
            try:
                box[0] = (compute(), None)
            except UserError as err:
                box[0] = (None, err)
        dist.broadcast_object_list(box, src=0)
        value, error = box[0]
        if error is not None:
            raise error
        return value

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank (small picklable objects)."""
        if self.size == 1:
            return [value]
        values: list = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def sum(self, *values: float) -> list[float]:
        """All-reduce a few Python numbers (float64 on CPU/GPU); identity on one process."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


@contextlib.contextmanager
def distributed_world(timeout_minutes: float = 30.0) -> Iterator[World]:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU) and always leave it.

    Destroying the group before exit matters: otherwise a rank aborts at interpreter shutdown.
    """
    import deepspeed

    timeout = timedelta(minutes=timeout_minutes)  # a collective waits this long: rank 0 alone may export a 7B model
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    size = int(os.environ.get("WORLD_SIZE", 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("WORLD_SIZE", str(size))
    # DS_ACCELERATOR=cpu (--gpus cpu) wins over a visible GPU: deepspeed.launcher.launch (--hostfile) sets
    # CUDA_VISIBLE_DEVICES to the host's slots even for CPU processes.
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
        use_tensor_cores_for_fp32()
    else:
        device = torch.device("cpu")
        backend = "gloo"
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart and size > 1:
        dist.init_process_group(backend, store=restart_store(rank, size, restart, timeout), rank=rank,
                                world_size=size, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the group above, if any
    try:
        if os.environ.get(FAIL_RANK_ENV) == str(rank):
            raise RuntimeError(f"{FAIL_RANK_ENV}={rank}: rank {rank} fails on purpose")
        yield World(rank=rank, local_rank=local_rank, size=size, device=device)
    finally:
        # Through deepspeed.comm, not torch.distributed: DeepSpeed caches its clone of the world group
        # in module globals, and only its own destroy clears them (a second run in one process would
        # otherwise use a dead group).
        if dist.is_initialized():
            deepspeed.comm.destroy_process_group()


def use_tensor_cores_for_fp32() -> None:
    """On a GPU, fp32 matmuls run on TensorFloat-32 tensor cores (A100/H100: about 8x the fp32 rate, 10 bits
    of mantissa in the products, fp32 accumulation), as the HF Trainer's --tf32 and most training code do.
    Not on a CPU, where "high" would let oneDNN round fp32 matmuls through bf16."""
    torch.set_float32_matmul_precision("high")


def restart_store(rank: int, size: int, restart: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store of a worker torchrun restarted (--max-restarts), namespaced by the attempt.

    torchrun keeps one TCPStore for all attempts (static and c10d rendezvous alike, pytorch#135712), so
    a restarted gloo/NCCL group would read the addresses the previous attempt's ranks published there
    and fail with "Connection refused". Every rank of a node restarts together, with the same count.
    """
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                          is_master=not agent_hosts_it and rank == 0, timeout=timeout)
    return dist.PrefixStore(f"dialogtrain/restart-{restart}", store)

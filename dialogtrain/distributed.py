"""Process-group set-up and rank-aware output, so the training loops never test `rank == 0`."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


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

    def sum(self, *values: float) -> list[float]:
        """All-reduce a few Python numbers (float64 on CPU/GPU); identity on one process."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


@contextlib.contextmanager
def distributed_world() -> Iterator[World]:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU) and always leave it.

    Destroying the group before exit matters: otherwise a rank aborts at interpreter shutdown.
    """
    import deepspeed

    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    size = int(os.environ.get("WORLD_SIZE", 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("WORLD_SIZE", str(size))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
    deepspeed.init_distributed(dist_backend=backend)
    try:
        yield World(rank=rank, local_rank=local_rank, size=size, device=device)
    finally:
        # Through deepspeed.comm, not torch.distributed: DeepSpeed caches its clone of the world group
        # in module globals, and only its own destroy clears them (a second run in one process would
        # otherwise use a dead group).
        if dist.is_initialized():
            deepspeed.comm.destroy_process_group()

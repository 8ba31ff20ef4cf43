"""Data-parallel ranks of one trial: who we are, and how the process group comes up.

A trial with `resources.world_size` > 1 runs as that many ranks under torch.distributed (gloo on
CPUs, NCCL on GPUs). Two ways in:
- launched by a scheduler that starts every rank itself (Slurm tasks, torchrun): the environment
  holds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and each process joins from it;
- launched as one process (local, Ray): this process becomes rank 0 and starts ranks 1..W−1 as
  spawned children on this machine, over a free loopback port.
Only rank 0 writes to the store.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A rank that died leaves the others blocked in a collective; gloo gives up after this long.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def device(self, gpus: int, choice: str) -> torch.device:
        """This rank's device: its own GPU when the trial has GPUs, else the CPU."""
        if choice == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but torch sees no GPU; use train.device=auto or cpu")
        if choice == "cpu" or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank if gpus > 1 else torch.cuda.current_device())


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def from_environment() -> Ranks | None:
    """The ranks a scheduler set up for us, or None when this process is a whole trial."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def join(ranks: Ranks, device: torch.device, init_method: str = "env://") -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        _backend(device), init_method=init_method, rank=ranks.rank, world_size=ranks.world,
        timeout=COLLECTIVE_TIMEOUT,
    )


def _child(local_rank: int, body: Callable[[Ranks, str], None], world: int, init_method: str) -> None:
    rank = local_rank + 1  # the parent is rank 0
    body(Ranks(rank, world, rank), init_method)


@contextmanager
def local_children(world: int, body: Callable[[Ranks, str], None]) -> Iterator[str]:
    """Start ranks 1..world−1 running `body(ranks, init_method)`; yields the init method for rank 0.

    On exit waits for the children and raises if one failed (its traceback went to stderr).
    """
    init_method = f"tcp://127.0.0.1:{free_port()}"
    context = mp.start_processes(_child, args=(body, world, init_method), nprocs=world - 1,
                                 join=False, start_method="spawn")
    try:
        yield init_method
    except BaseException:
        # Rank 0 is stopping early (failure, preemption): the others would wait in a collective.
        for process in context.processes:
            process.terminate()
        raise
    while not context.join():
        pass


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a stop signal)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())

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
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A rank that died leaves the others blocked in a collective, which gives up after this long. Long
# enough for rank 0 to evaluate and checkpoint alone while the others wait at the next collective
# (a large model's evaluation and checkpoint take minutes), short enough to free a dead job's nodes.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# How long the other locally spawned ranks may take to exit on their own after one of them failed.
EXIT_GRACE_S = 30.0


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks of this trial on this node
    spawned: bool = False  # started here by local_children: every rank sees the same GPUs

    @property
    def leader(self) -> bool:
        return self.rank == 0


def device_for(gpus: float, choice: str, ranks: Ranks) -> torch.device:
    """The one rule for a rank's device.

    - `resources.gpus: 0` trains on the CPU everywhere (a CPU trial never takes a GPU it did not
      ask for, whatever the executor); `train.device: cuda` then is a contradiction.
    - With GPUs, `train.device: auto` uses CUDA when torch sees it, else the CPU (a node whose GPUs
      the scheduler only pretends to have); `train.device: cuda` without CUDA is an error.
    - A rank takes device `local_rank % device_count()`: the node's GPUs in order when every rank
      sees all of them, its own when the site binds one GPU per task (each task then sees one).
      Ranks spawned here share one view of the GPUs, so they need one each: too few is an error
      before any training.
    """
    if choice == "cuda" and gpus == 0:
        raise RuntimeError("train.device=cuda but resources.gpus=0; ask for resources.gpus > 0 "
                           "or use train.device=auto or cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch sees no GPU; use train.device=auto or cpu")
    if gpus == 0 or choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if ranks.local_world > count and (count > 1 or ranks.spawned):
        raise RuntimeError(
            f"{ranks.local_world} ranks of this trial run on this node but only {count} GPUs are "
            f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); lower "
            "resources.gpus or make more GPUs visible"
        )
    return torch.device("cuda", ranks.local_rank % count)


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
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def join(ranks: Ranks, device: torch.device, init_method: str = "env://") -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        _backend(device), init_method=init_method, rank=ranks.rank, world_size=ranks.world,
        timeout=COLLECTIVE_TIMEOUT,
    )


def _child(local_rank: int, body: Callable[[Ranks, str], None], world: int, init_method: str,
           finished: Any) -> None:
    rank = local_rank + 1  # the parent is rank 0
    body(Ranks(rank, world, rank, world, spawned=True), init_method)
    finished[local_rank] = 1  # its part is done: whatever happens on the way out changes nothing


@contextmanager
def local_children(world: int, body: Callable[[Ranks, str], None]) -> Iterator[str]:
    """Start ranks 1..world−1 running `body(ranks, init_method)`; yields the init method for rank 0.

    On exit waits for the children and raises if one failed (its traceback went to stderr). A
    child that returned from `body` and then died on its way out (seen once in a few hundred
    two-rank trials: SIGABRT at exit, after every step and collective) is reported on stderr, not
    raised: its part of the trial was complete.
    """
    init_method = f"tcp://127.0.0.1:{free_port()}"
    finished = mp.get_context("spawn").Array("b", world - 1)
    context = mp.start_processes(_child, args=(body, world, init_method, finished),
                                 nprocs=world - 1, join=False, start_method="spawn")
    try:
        yield init_method
    except BaseException:
        # Rank 0 is stopping early (failure, preemption): the others would wait in a collective.
        for process in context.processes:
            process.terminate()
        raise
    try:
        # grace: when one child fails, the others get time to finish before they are terminated.
        while not context.join(grace_period=EXIT_GRACE_S):
            pass
    except mp.ProcessExitedException as error:
        if not all(finished):
            raise
        sys.stderr.write(f"rank {error.error_index + 1} (pid {error.error_pid}) {error} after finishing "
                         "its part of the trial; every rank finished, so the trial's results stand\n")


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a stop signal)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())

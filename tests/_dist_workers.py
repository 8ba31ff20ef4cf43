"""Real gloo ranks on localhost for tests/test_distributed_losses.py.

The spawned processes import this module by name (spawn pickles the worker by reference), so it
lives in the tests package rather than in a test module. Every rank computes each case of
`CASES` on its share of one global batch and saves what it got; the test compares that with the
single-process loss on the whole batch.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scalestudy.distributed_losses import distributed_sigmoid_loss, distributed_softmax_loss
from scalestudy.losses import sigmoid_loss, softmax_loss

ROWS_PER_RANK, DIM, INPUT_DIM = 5, 6, 7
SCALE, BIAS, MASK_SEED = 7.0, -3.0, 11

Loss = Callable[..., torch.Tensor]

# name -> (distributed loss, single-process loss, uses a bias, extra keyword args).
# Chunks of 4 and 2 divide neither the 5 rows per rank nor the global batch.
CASES: dict[str, tuple[Loss, Loss, bool, dict[str, Any]]] = {
    "softmax": (distributed_softmax_loss, softmax_loss, False, {}),
    "softmax chunk 4": (distributed_softmax_loss, softmax_loss, False, {"chunk_size": 4}),
    "sigmoid": (distributed_sigmoid_loss, sigmoid_loss, True, {}),
    "sigmoid chunk 2": (distributed_sigmoid_loss, sigmoid_loss, True, {"chunk_size": 2}),
    "sigmoid without bias": (distributed_sigmoid_loss, sigmoid_loss, False, {}),
    "sigmoid balanced negatives": (distributed_sigmoid_loss, sigmoid_loss, True,
                                   {"negative_weight": "balanced"}),
    "sigmoid weighted and masked negatives": (distributed_sigmoid_loss, sigmoid_loss, True,
                                              {"negative_weight": 0.5, "negative_mask_ratio": 0.4}),
    # Duplicate captions (`caption_ids`) within and across ranks' blocks.
    "sigmoid duplicates positive, balanced, chunk 2": (
        distributed_sigmoid_loss, sigmoid_loss, True,
        {"duplicates": "positive", "negative_weight": "balanced", "chunk_size": 2}),
    "sigmoid duplicates masked, masked negatives": (
        distributed_sigmoid_loss, sigmoid_loss, True,
        {"duplicates": "masked", "negative_weight": "balanced", "negative_mask_ratio": 0.4}),
    "softmax duplicates positive": (distributed_softmax_loss, softmax_loss, False,
                                    {"duplicates": "positive"}),
    "softmax duplicates masked chunk 4": (distributed_softmax_loss, softmax_loss, False,
                                          {"duplicates": "masked", "chunk_size": 4}),
}
DDP_CASES = ("softmax", "sigmoid", "sigmoid balanced negatives", "softmax duplicates positive",
             "sigmoid duplicates positive, balanced, chunk 2")


def global_features(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch: L2-normalised float64 image and text features."""
    generator = torch.Generator().manual_seed(world)
    batch = ROWS_PER_RANK * world
    return tuple(F.normalize(torch.randn(batch, DIM, generator=generator, dtype=torch.float64), dim=1)
                 for _ in range(2))  # type: ignore[return-value]


def global_inputs(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw tower inputs of the concatenated batch, for the DDP cases."""
    generator = torch.Generator().manual_seed(100 + world)
    batch = ROWS_PER_RANK * world
    return tuple(torch.randn(batch, INPUT_DIM, generator=generator, dtype=torch.float64)
                 for _ in range(2))  # type: ignore[return-value]


def caption_ids(batch: int) -> torch.Tensor:
    """Caption ids of the global batch: squares mod 7 (groups of 2–4 rows, spread over the ranks'
    blocks), every fourth row a caption of its own."""
    return torch.tensor([100 + i if i % 4 == 0 else i * i % 7 for i in range(batch)])


def mask_generator(rank: int) -> torch.Generator:
    """Rank 0's generator is the single-process one; the others differ on purpose (the seed is broadcast)."""
    return torch.Generator().manual_seed(MASK_SEED + rank)


def call(loss: Loss, uses_bias: bool, kwargs: dict[str, Any], image: torch.Tensor,
         text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, rank: int) -> torch.Tensor:
    """Call a case's loss the way the trainer does: positional (image, text, scale[, bias])."""
    options = dict(kwargs)
    if "negative_mask_ratio" in options:
        options["generator"] = mask_generator(rank)
    if "duplicates" in options:  # the ids of the global batch, on every rank
        world = dist.get_world_size() if loss in (distributed_sigmoid_loss, distributed_softmax_loss) else 1
        options["groups"] = caption_ids(image.shape[0] * world)
    if loss in (sigmoid_loss, distributed_sigmoid_loss):
        return loss(image, text, scale, bias if uses_bias else None, **options)
    return loss(image, text, scale, **options)


class TinyTowers(nn.Module):
    """Two linear towers with L2-normalised outputs, a learnable log t and an optional b."""

    def __init__(self, uses_bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same init on every rank and in the test
        self.image = nn.Linear(INPUT_DIM, DIM, dtype=torch.float64)
        self.text = nn.Linear(INPUT_DIM, DIM, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.tensor(SCALE, dtype=torch.float64).log())
        self.bias = nn.Parameter(torch.tensor(BIAS, dtype=torch.float64)) if uses_bias else None

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(images), dim=1), F.normalize(self.text(texts), dim=1)


def towers_loss(model: nn.Module, towers: nn.Module, case: str, images: torch.Tensor,
                texts: torch.Tensor, distributed: bool, rank: int = 0) -> torch.Tensor:
    loss, single, uses_bias, kwargs = CASES[case]
    image, text = towers(images, texts)
    return call(loss if distributed else single, uses_bias, kwargs, image, text,
                model.log_scale.exp(), model.bias, rank)


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # up to 4 ranks share 2 cores
    # A short collective timeout turns a hang into an error the test sees.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    local = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    results: dict[str, Any] = {}
    image_all, text_all = global_features(world)
    for name, (loss, _, uses_bias, kwargs) in CASES.items():
        image = image_all[local].clone().requires_grad_()
        text = text_all[local].clone().requires_grad_()
        scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
        value = call(loss, uses_bias, kwargs, image, text, scale, bias, rank)
        value.backward()
        results[name] = {"loss": value.detach(), "image": image.grad, "text": text.grad,
                         "scale": scale.grad, "bias": bias.grad}
        with torch.no_grad():
            results[name]["loss without grad"] = call(loss, uses_bias, kwargs, image, text, scale,
                                                      bias, rank)
    images_all, texts_all = global_inputs(world)
    for name in DDP_CASES:
        model = TinyTowers(uses_bias=CASES[name][2])
        ddp = DistributedDataParallel(model)  # held until after backward: its hooks average the grads
        value = towers_loss(model, ddp, name, images_all[local], texts_all[local], True, rank)
        value.backward()
        results[f"ddp {name}"] = {"loss": value.detach(),
                                  **{k: p.grad for k, p in model.named_parameters()}}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()  # every rank is through its last collective before any tears the group down
    dist.destroy_process_group()
    # Skip interpreter finalization: gloo's threads can abort it ("terminate called without an
    # active exception", SIGABRT; seen once in a full `make test`, the results already saved).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(world: int, out_dir: Path, timeout_s: float) -> list[dict[str, Any]]:
    """Spawn ``world`` gloo ranks running every case; each rank's results, or TimeoutError."""
    context = mp.start_processes(_rank, args=(world, _free_port(), str(out_dir)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} gloo ranks still running after {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(Path(out_dir) / f"rank{rank}.pt") for rank in range(world)]


# Bodies for scalestudy.train.ranks.local_children (tests/test_data_parallel.py).
def abort_on_the_way_out(ranks: Any, init_method: str) -> None:
    """Finish, then abort while the process exits (what a gloo teardown once did to a rank)."""

    def later() -> None:
        time.sleep(0.2)  # the body has returned by now; the process waits for this thread
        os.abort()

    threading.Thread(target=later).start()


def abort_midway(ranks: Any, init_method: str) -> None:
    """Die before finishing its part."""
    os.abort()

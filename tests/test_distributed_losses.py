"""The data-parallel losses on 2 and 4 real gloo ranks equal the single-process loss.

One spawn per world size runs every case (tests/_dist_workers.py); each test below checks one
promise of scalestudy.distributed_losses' gradient convention against the single-process loss
on the concatenated batch (itself proven equal to the per-pair formula in tests/test_losses.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests._dist_workers import (
    BIAS,
    CASES,
    DDP_CASES,
    ROWS_PER_RANK,
    SCALE,
    TinyTowers,
    call,
    global_features,
    global_inputs,
    run_ranks,
    towers_loss,
)

# Spawning 2 and 4 ranks costs half a minute on a busy 2-core machine (each imports torch), so these
# run with the training tests, not in `make test-fast`.
pytestmark = pytest.mark.train

# Generous: importing torch in each spawned rank dominates, and takes long on a loaded machine;
# inside the ranks a 30 s collective timeout already turns a deadlock into an error.
SPAWN_TIMEOUT_S = 240.0
TOL = {"rtol": 1e-12, "atol": 1e-12}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda world: f"world{world}")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict[str, Any]]]:
    size = request.param
    return size, run_ranks(size, tmp_path_factory.mktemp(f"world{size}"), SPAWN_TIMEOUT_S)


def single_process(name: str, world: int) -> dict[str, torch.Tensor]:
    """Value and gradients of the single-process naive loss on the concatenated batch."""
    _, single, uses_bias, kwargs = CASES[name]
    images, texts = (f.clone().requires_grad_() for f in global_features(world))
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    loss = call(single, uses_bias, kwargs, images, texts, scale, bias, rank=0)
    loss.backward()
    return {"loss": loss.detach(), "image": images.grad, "text": texts.grad, "scale": scale.grad,
            "bias": bias.grad}


def local_rows(rank: int) -> slice:
    return slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)


@pytest.mark.parametrize("name", CASES)
def test_every_rank_returns_the_global_loss(world: tuple[int, list[dict[str, Any]]], name: str) -> None:
    size, ranks = world
    expected = single_process(name, size)["loss"]
    for rank in ranks:
        torch.testing.assert_close(rank[name]["loss"], expected, **TOL)
        torch.testing.assert_close(rank[name]["loss without grad"], expected, **TOL)


@pytest.mark.parametrize("name", CASES)
def test_each_rank_holds_world_size_times_the_gradient_of_its_own_feature_rows(
    world: tuple[int, list[dict[str, Any]]], name: str
) -> None:
    size, ranks = world
    expected = single_process(name, size)
    for index, rank in enumerate(ranks):
        for tower in ("image", "text"):
            torch.testing.assert_close(rank[name][tower], size * expected[tower][local_rows(index)], **TOL)


@pytest.mark.parametrize("name", CASES)
def test_scale_and_bias_gradients_averaged_over_ranks_equal_the_single_process_ones(
    world: tuple[int, list[dict[str, Any]]], name: str
) -> None:
    size, ranks = world
    expected = single_process(name, size)
    uses_bias = CASES[name][2]
    for param in ("scale", "bias") if uses_bias else ("scale",):
        averaged = sum(rank[name][param] for rank in ranks) / size
        torch.testing.assert_close(averaged, expected[param], **TOL)
    if not uses_bias:
        assert all(rank[name]["bias"] is None for rank in ranks)


@pytest.mark.parametrize("name", DDP_CASES)
def test_ddp_averaged_parameter_gradients_equal_single_process_training(
    world: tuple[int, list[dict[str, Any]]], name: str
) -> None:
    size, ranks = world
    model = TinyTowers(uses_bias=CASES[name][2])
    images, texts = global_inputs(size)
    loss = towers_loss(model, model, name, images, texts, distributed=False)
    loss.backward()
    for rank in ranks:
        torch.testing.assert_close(rank[f"ddp {name}"]["loss"], loss.detach(), **TOL)
        for param_name, param in model.named_parameters():
            torch.testing.assert_close(rank[f"ddp {name}"][param_name], param.grad, **TOL)

"""Every loss form equals its paper's per-pair formula, written out here with Python loops.

The references below score each (i, j) pair on its own — CLIP's two cross-entropies (Radford et
al. 2021, Fig. 3) and SigLIP's −log σ(z_ij (t xᵢ·yⱼ + b)) / B (Zhai et al. 2023, Algorithm 1) —
in float64, and autograd through them gives the reference gradients.
"""

from __future__ import annotations

import doctest
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import scalestudy.losses
from scalestudy.losses import negative_mask, sigmoid_loss, softmax_loss

TOL = {"rtol": 1e-10, "atol": 1e-12}
Weight = Callable[[int, int], float]


def per_pair_softmax(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    batch = x.shape[0]
    logit = [[t * torch.dot(x[i], y[j]) for j in range(batch)] for i in range(batch)]
    image_to_text = sum(-logit[i][i] + torch.logsumexp(torch.stack(logit[i]), 0) for i in range(batch))
    text_to_image = sum(-logit[j][j] + torch.logsumexp(torch.stack([logit[i][j] for i in range(batch)]), 0)
                        for j in range(batch))
    return (image_to_text / batch + text_to_image / batch) / 2


def per_pair_sigmoid(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, b: torch.Tensor | None,
                     weight: Weight = lambda i, j: 1.0) -> torch.Tensor:
    batch = x.shape[0]
    total = torch.zeros((), dtype=x.dtype)
    for i in range(batch):
        for j in range(batch):
            z = 1.0 if i == j else -1.0
            logit = t * torch.dot(x[i], y[j]) + (0.0 if b is None else b)
            total = total + (1.0 if i == j else weight(i, j)) * -torch.log(torch.sigmoid(z * logit))
    return total / batch


def features(batch: int, dim: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=1)
                 .to(dtype).requires_grad_() for _ in range(2))  # type: ignore[return-value]


def scalar(value: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def value_and_grads(loss: Callable[..., torch.Tensor], *inputs: torch.Tensor | None) -> list[torch.Tensor]:
    value = loss(*inputs)
    wrt = [v for v in inputs if v is not None and v.requires_grad]
    return [value.detach(), *torch.autograd.grad(value, wrt)]


def assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOL)


sizes = st.tuples(st.integers(1, 9), st.integers(1, 5), st.integers(1, 12), st.integers(0, 2**16))
EDGE_CHUNKS = [(7, 3), (7, 1), (7, 10), (8, 8), (8, 4)]  # uneven, 1, > B, = B, dividing


def test_naive_softmax_matches_the_per_pair_formula_in_value_and_gradients() -> None:
    x, y = features(6, 4, seed=0)
    t = scalar(5.0)
    assert_same(value_and_grads(softmax_loss, x, y, t), value_and_grads(per_pair_softmax, x, y, t))


@pytest.mark.parametrize("bias", [-3.0, None])
def test_naive_sigmoid_matches_the_per_pair_formula_in_value_and_gradients(bias: float | None) -> None:
    x, y = features(6, 4, seed=1)
    t, b = scalar(5.0), None if bias is None else scalar(bias)
    assert_same(value_and_grads(sigmoid_loss, x, y, t, b), value_and_grads(per_pair_sigmoid, x, y, t, b))


@settings(max_examples=25, deadline=None)
@given(sizes, st.floats(0.5, 30.0))
def test_streaming_softmax_matches_the_per_pair_formula_in_value_and_gradients(
    size: tuple[int, int, int, int], scale: float
) -> None:
    batch, dim, chunk, seed = size
    x, y = features(batch, dim, seed)
    t = scalar(scale)
    streamed = value_and_grads(lambda *a: softmax_loss(*a, chunk_size=chunk), x, y, t)
    assert_same(streamed, value_and_grads(per_pair_softmax, x, y, t))


@settings(max_examples=25, deadline=None)
@given(sizes, st.floats(0.5, 30.0), st.one_of(st.none(), st.floats(-12.0, 2.0)))
def test_chunked_sigmoid_matches_the_per_pair_formula_in_value_and_gradients(
    size: tuple[int, int, int, int], scale: float, bias: float | None
) -> None:
    batch, dim, chunk, seed = size
    x, y = features(batch, dim, seed)
    t, b = scalar(scale), None if bias is None else scalar(bias)
    chunked = value_and_grads(lambda *a: sigmoid_loss(*a, chunk_size=chunk), x, y, t, b)
    assert_same(chunked, value_and_grads(per_pair_sigmoid, x, y, t, b))


@pytest.mark.parametrize(("batch", "chunk"), EDGE_CHUNKS)
def test_chunked_and_streaming_losses_match_the_naive_ones_at_edge_chunk_sizes(batch: int, chunk: int) -> None:
    x, y = features(batch, 3, seed=batch * chunk)
    t, b = scalar(9.0), scalar(-4.0)
    assert_same(value_and_grads(lambda *a: sigmoid_loss(*a, chunk_size=chunk), x, y, t, b),
                value_and_grads(sigmoid_loss, x, y, t, b))
    assert_same(value_and_grads(lambda *a: softmax_loss(*a, chunk_size=chunk), x, y, t),
                value_and_grads(softmax_loss, x, y, t))


@pytest.mark.parametrize("chunk", [None, 3])
def test_balanced_negatives_weigh_one_over_b_minus_one_each(chunk: int | None) -> None:
    x, y = features(7, 4, seed=2)
    t = scalar(10.0)
    balanced = value_and_grads(
        lambda *a: sigmoid_loss(*a, None, chunk, negative_weight="balanced"), x, y, t)
    assert_same(balanced, value_and_grads(lambda *a: per_pair_sigmoid(*a, None, lambda i, j: 1 / 6), x, y, t))


@pytest.mark.parametrize("chunk", [None, 2])
def test_a_given_negative_weight_multiplies_every_negative_term(chunk: int | None) -> None:
    x, y = features(5, 4, seed=3)
    t, b = scalar(4.0), scalar(-2.0)
    weighted = value_and_grads(lambda *a: sigmoid_loss(*a, chunk, negative_weight=0.25), x, y, t, b)
    assert_same(weighted, value_and_grads(lambda *a: per_pair_sigmoid(*a, lambda i, j: 0.25), x, y, t, b))


@pytest.mark.parametrize("chunk", [None, 1, 3, 10])
def test_masked_negatives_drop_out_of_the_sum(chunk: int | None) -> None:
    x, y = features(8, 4, seed=4)
    t, b = scalar(6.0), scalar(-5.0)
    kept = negative_mask(8, 0.5, torch.Generator().manual_seed(5))
    masked = value_and_grads(lambda *a: sigmoid_loss(
        *a, chunk, negative_weight=0.5, negative_mask_ratio=0.5,
        generator=torch.Generator().manual_seed(5)), x, y, t, b)
    expected = value_and_grads(
        lambda *a: per_pair_sigmoid(*a, lambda i, j: 0.5 * float(kept[i, j])), x, y, t, b)
    assert_same(masked, expected)


def test_the_negative_mask_keeps_positives_and_drops_about_the_ratio() -> None:
    kept = negative_mask(400, 0.3, torch.Generator().manual_seed(0))
    assert kept.diagonal().all()
    dropped = 1 - kept[~torch.eye(400, dtype=torch.bool)].float().mean()
    assert abs(dropped.item() - 0.3) < 0.01  # 159 600 pairs: the binomial sd is 0.0011
    assert not torch.equal(kept[0], kept[1])  # not one pattern repeated row after row


def test_the_negative_mask_is_deterministic_given_the_generator_and_changes_with_it() -> None:
    generator = torch.Generator().manual_seed(42)
    first, second = negative_mask(50, 0.5, generator), negative_mask(50, 0.5, generator)
    assert torch.equal(first, negative_mask(50, 0.5, torch.Generator().manual_seed(42)))
    assert not torch.equal(first, second)  # the generator advanced: the next step masks anew


def test_losses_without_autograd_give_the_same_value() -> None:
    x, y = features(9, 4, seed=6)
    t, b = scalar(8.0), scalar(-6.0)
    with torch.no_grad():
        assert_same([sigmoid_loss(x, y, t, b, 4)], [sigmoid_loss(x, y, t, b)])
        assert_same([softmax_loss(x, y, t, 4)], [softmax_loss(x, y, t)])


def test_tiled_losses_differentiate_only_the_inputs_that_require_grad() -> None:
    x, y = features(6, 3, seed=7)
    frozen_text, fixed_scale = y.detach(), torch.tensor(3.0, dtype=torch.float64)
    b = scalar(-1.0)
    assert_same(value_and_grads(lambda *a: sigmoid_loss(*a, chunk_size=4), x, frozen_text, fixed_scale, b),
                value_and_grads(sigmoid_loss, x, frozen_text, fixed_scale, b))
    assert_same(value_and_grads(lambda *a: softmax_loss(*a, chunk_size=4), x, frozen_text, fixed_scale),
                value_and_grads(softmax_loss, x, frozen_text, fixed_scale))


@pytest.mark.parametrize("loss", [sigmoid_loss, softmax_loss])
def test_tiled_losses_stay_finite_and_exact_at_extreme_logits(loss: Callable[..., torch.Tensor]) -> None:
    # t = 1000 puts logits at ±1000, far past float32's exp overflow at 88.
    x, y = features(10, 3, seed=8, dtype=torch.float32)
    t = scalar(1000.0, torch.float32)
    tiled, naive = value_and_grads(lambda *a: loss(*a, chunk_size=3), x, y, t), value_and_grads(loss, x, y, t)
    assert all(v.isfinite().all() for v in tiled)
    for a, e in zip(tiled, naive):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("loss", [sigmoid_loss, softmax_loss])
def test_tiled_losses_accept_bfloat16_features_and_return_grads_in_the_input_dtypes(
    loss: Callable[..., torch.Tensor]
) -> None:
    x, y = features(12, 8, seed=9, dtype=torch.bfloat16)
    t = scalar(10.0, torch.float32)
    value, grad_x, grad_y, grad_t = value_and_grads(lambda *a: loss(*a, chunk_size=5), x, y, t)
    assert (value.dtype, grad_x.dtype, grad_y.dtype, grad_t.dtype) == (
        torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32)
    wide = value_and_grads(lambda *a: loss(*a, chunk_size=5), x.float().detach().requires_grad_(),
                           y.float().detach().requires_grad_(), t)
    torch.testing.assert_close(value.float(), wide[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad_t, wide[3], rtol=1e-4, atol=1e-4)


class LargestTensor(TorchDispatchMode):
    """Records the most elements any op produced while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


@pytest.mark.parametrize("variant", [
    lambda x, y, t, b: sigmoid_loss(x, y, t, b, 8, negative_mask_ratio=0.5),
    lambda x, y, t, b: sigmoid_loss(x, y, t, b, 8, negative_weight="balanced"),
    lambda x, y, t, b: softmax_loss(x, y, t, 8),
], ids=["masked sigmoid", "balanced sigmoid", "softmax"])
def test_tiled_losses_never_create_a_tensor_near_the_size_of_the_logits(
    variant: Callable[..., torch.Tensor]
) -> None:
    x, y = features(64, 4, seed=10)
    t, b = scalar(10.0), scalar(-10.0)
    with LargestTensor() as seen:
        variant(x, y, t, b).backward()
    assert seen.numel <= 64 * 4  # the B×D features and their gradients; a tile is 8×8
    with LargestTensor() as naive:
        sigmoid_loss(x, y, t, b).backward()
    assert naive.numel == 64 * 64  # the probe does see the logits when they exist


def test_the_trainer_call_signatures_still_work_positionally() -> None:
    x, y = features(4, 3, seed=11)
    t, b = scalar(10.0), scalar(-10.0)
    assert_same([softmax_loss(x, y, t).detach()], [per_pair_softmax(x, y, t).detach()])
    assert_same([sigmoid_loss(x, y, t, b).detach()], [per_pair_sigmoid(x, y, t, b).detach()])


@pytest.mark.parametrize(("call", "message"), [
    (lambda x: sigmoid_loss(x, x, 1.0, chunk_size=0), "chunk_size=0"),
    (lambda x: sigmoid_loss(x, x[:2], 1.0), r"image \(4, 3\) and text \(2, 3\)"),
    (lambda x: sigmoid_loss(x, x, 1.0, negative_weight=-1.0), "negative_weight=-1.0"),
    (lambda x: sigmoid_loss(x, x, 1.0, negative_weight="half"), "negative_weight='half'"),
    (lambda x: sigmoid_loss(x, x, 1.0, negative_mask_ratio=1.0), "negative_mask_ratio=1.0"),
])
def test_bad_arguments_are_rejected_with_the_value_and_the_fix(
    call: Callable[[torch.Tensor], torch.Tensor], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(torch.ones(4, 3))


def test_the_docstring_examples_run() -> None:
    assert doctest.testmod(scalestudy.losses, verbose=False).failed == 0

"""Every loss form equals its paper's per-pair formula, written out here with Python loops.

The references below score each (i, j) pair on its own — CLIP's two cross-entropies (Radford et
al. 2021, Fig. 3) and SigLIP's −log σ(z_ij (t xᵢ·yⱼ + b)) / B (Zhai et al. 2023, Algorithm 1) —
in float64, and autograd through them gives the reference gradients. Which pairs are positives,
and which a softmax keeps, are parameters, so rows with duplicate captions are checked the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch.utils._python_dispatch import TorchDispatchMode

from scalestudy.losses import caption_groups, negative_mask, sigmoid_loss, softmax_loss
from scalestudy.spec import LossSpec

TOL = {"rtol": 1e-10, "atol": 1e-12}
Weight = Callable[[int, int], float]
Pair = Callable[[int, int], bool]


def diagonal(i: int, j: int) -> bool:
    return i == j


def every_pair(i: int, j: int) -> bool:
    return True


def per_pair_softmax(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, positive: Pair = diagonal,
                     kept: Pair = every_pair) -> torch.Tensor:
    """Each row's (column's) cross-entropy: log Σ exp over the kept pairs − the mean positive logit."""
    batch = x.shape[0]
    logit = [[t * torch.dot(x[i], y[j]) for j in range(batch)] for i in range(batch)]

    def cross_entropy(pairs: list[tuple[int, int]]) -> torch.Tensor:
        positives = [logit[i][j] for i, j in pairs if positive(i, j)]
        lse = torch.logsumexp(torch.stack([logit[i][j] for i, j in pairs if kept(i, j)]), 0)
        return lse - sum(positives) / len(positives)

    image_to_text = sum(cross_entropy([(i, j) for j in range(batch)]) for i in range(batch))
    text_to_image = sum(cross_entropy([(i, j) for i in range(batch)]) for j in range(batch))
    return (image_to_text / batch + text_to_image / batch) / 2


def per_pair_sigmoid(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, b: torch.Tensor | None,
                     weight: Weight = lambda i, j: 1.0, positive: Pair = diagonal) -> torch.Tensor:
    """Σ_ij w_ij −log σ(z_ij logit_ij) / B; positives have z = +1 and weigh 1, negatives ``weight``."""
    batch = x.shape[0]
    total = torch.zeros((), dtype=x.dtype)
    for i in range(batch):
        for j in range(batch):
            z = 1.0 if positive(i, j) else -1.0
            logit = t * torch.dot(x[i], y[j]) + (0.0 if b is None else b)
            total = total + (1.0 if positive(i, j) else weight(i, j)) * -torch.log(torch.sigmoid(z * logit))
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
# Found by hypothesis: logits of ±20.02 (one-dimensional features), where softplus's linear branch
# dropped 2e-9 per pair in float64 (scalestudy.losses._softplus).
@example(size=(5, 1, 1, 15154), scale=18.515625, bias=1.5)
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


# --- losses that predict their own difference from the plain loss ---------------------------


def sigmoid_terms(
    x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain loss's positive and negative terms −log σ(±s_ij), as B×B matrices (0 elsewhere)."""
    logits = (t * x @ y.t() + b).detach()
    eye = torch.eye(x.shape[0], dtype=torch.bool)
    return F.softplus(-logits) * eye, F.softplus(logits) * ~eye


@pytest.mark.parametrize("chunk", [None, 3])
def test_a_balanced_sigmoid_loss_shrinks_the_plain_losss_negative_part_by_b_minus_one(
    chunk: int | None
) -> None:
    x, y = features(9, 4, seed=20)
    t, b = scalar(10.0), scalar(-2.0)
    positive_terms, negative_terms = sigmoid_terms(x, y, t, b)
    plain = sigmoid_loss(x, y, t, b, chunk).detach()
    balanced = sigmoid_loss(x, y, t, b, chunk, negative_weight="balanced").detach()
    torch.testing.assert_close(plain, (positive_terms.sum() + negative_terms.sum()) / 9, **TOL)
    torch.testing.assert_close(plain - balanced, negative_terms.sum() / 9 * (1 - 1 / 8), **TOL)


@pytest.mark.parametrize("chunk", [None, 3])
def test_a_masked_sigmoid_loss_lacks_exactly_the_negative_terms_of_the_dropped_pairs(
    chunk: int | None
) -> None:
    x, y = features(9, 4, seed=21)
    t, b = scalar(10.0), scalar(-2.0)
    _, negative_terms = sigmoid_terms(x, y, t, b)
    dropped = ~negative_mask(9, 0.4, torch.Generator().manual_seed(3))
    plain = sigmoid_loss(x, y, t, b, chunk).detach()
    masked = sigmoid_loss(x, y, t, b, chunk, negative_mask_ratio=0.4,
                          generator=torch.Generator().manual_seed(3)).detach()
    assert dropped.any()
    torch.testing.assert_close(plain - masked, (negative_terms * dropped).sum() / 9, **TOL)


def test_masking_a_ratio_of_negatives_removes_about_that_fraction_of_the_negative_loss() -> None:
    x, y = features(300, 8, seed=22)
    t, b = scalar(10.0), scalar(-2.0)
    positive_terms, negative_terms = sigmoid_terms(x, y, t, b)
    masked = sigmoid_loss(x, y, t, b, 64, negative_mask_ratio=0.7,
                          generator=torch.Generator().manual_seed(0)).detach()
    kept_share = (masked - positive_terms.sum() / 300) / (negative_terms.sum() / 300)
    # 89 700 negative pairs, each kept with probability 0.3: the kept share's sd is ~0.002.
    assert abs(kept_share.item() - 0.3) < 0.01


# --- duplicate captions ---------------------------------------------------------------------


def same_caption(groups: torch.Tensor) -> Pair:
    return lambda i, j: bool(groups[i] == groups[j])


def reference_sigmoid(groups: torch.Tensor, duplicates: str, negative_weight: float | str | None,
                      kept: torch.Tensor) -> Callable[..., torch.Tensor]:
    """per_pair_sigmoid with duplicates as positives or dropped, ``kept`` the random mask.

    "balanced" = positive pairs / negative pairs, counted here pair by pair.
    """
    same = same_caption(groups)
    positive = same if duplicates == "positive" else diagonal
    dropped = (lambda i, j: i != j and same(i, j)) if duplicates == "masked" else (lambda i, j: False)
    batch = groups.shape[0]
    pairs = [(i, j) for i in range(batch) for j in range(batch)]
    n_positive = sum(positive(i, j) for i, j in pairs)
    n_negative = sum(not positive(i, j) and not dropped(i, j) for i, j in pairs)
    if negative_weight == "balanced":
        weight = n_positive / n_negative if n_negative else 1.0
    else:
        weight = 1.0 if negative_weight is None else float(negative_weight)
    return lambda *a: per_pair_sigmoid(
        *a, lambda i, j: 0.0 if dropped(i, j) else weight * float(kept[i, j]), positive)


def reference_softmax(groups: torch.Tensor, duplicates: str) -> Callable[..., torch.Tensor]:
    same = same_caption(groups)
    if duplicates == "positive":
        return lambda *a: per_pair_softmax(*a, positive=same)
    if duplicates == "masked":
        return lambda *a: per_pair_softmax(*a, kept=lambda i, j: i == j or not same(i, j))
    return per_pair_softmax


def random_groups(batch: int, ids: int, seed: int) -> torch.Tensor:
    """Caption ids drawn from ``ids`` values (few values: many duplicates), as arbitrary int64s."""
    drawn = torch.randint(0, ids, (batch,), generator=torch.Generator().manual_seed(seed))
    return drawn * 1_000_003 - 7  # any integers: only equality matters


@pytest.mark.parametrize("duplicates", ["positive", "masked"])
@pytest.mark.parametrize("bias", [-3.0, None])
def test_naive_sigmoid_with_duplicate_captions_matches_the_per_pair_formula(
    duplicates: str, bias: float | None
) -> None:
    x, y = features(7, 4, seed=23)
    t, b = scalar(5.0), None if bias is None else scalar(bias)
    groups = torch.tensor([4, 9, 4, 2, 9, 4, 5])
    naive = value_and_grads(lambda *a: sigmoid_loss(*a, groups=groups, duplicates=duplicates), x, y, t, b)
    expected = reference_sigmoid(groups, duplicates, None, torch.ones(7, 7, dtype=torch.bool))
    assert_same(naive, value_and_grads(expected, x, y, t, b))


@pytest.mark.parametrize("duplicates", ["positive", "masked"])
def test_naive_softmax_with_duplicate_captions_matches_the_per_pair_formula(duplicates: str) -> None:
    x, y = features(7, 4, seed=24)
    t = scalar(5.0)
    groups = torch.tensor([4, 9, 4, 2, 9, 4, 5])
    naive = value_and_grads(lambda *a: softmax_loss(*a, groups=groups, duplicates=duplicates), x, y, t)
    assert_same(naive, value_and_grads(reference_softmax(groups, duplicates), x, y, t))


@settings(max_examples=30, deadline=None)
@given(sizes, st.integers(1, 9), st.sampled_from(["positive", "masked"]),
       st.sampled_from([None, "balanced", 0.25]), st.sampled_from([0.0, 0.5]),
       st.one_of(st.none(), st.floats(-12.0, 2.0)))
def test_chunked_sigmoid_with_duplicate_captions_matches_the_per_pair_formula(
    size: tuple[int, int, int, int], ids: int, duplicates: str, negative_weight: float | str | None,
    ratio: float, bias: float | None,
) -> None:
    batch, dim, chunk, seed = size
    x, y = features(batch, dim, seed)
    t, b = scalar(7.0), None if bias is None else scalar(bias)
    groups = random_groups(batch, ids, seed)
    kept = negative_mask(batch, ratio, torch.Generator().manual_seed(seed))
    chunked = value_and_grads(lambda *a: sigmoid_loss(
        *a, chunk_size=chunk, negative_weight=negative_weight, negative_mask_ratio=ratio,
        generator=torch.Generator().manual_seed(seed), groups=groups, duplicates=duplicates), x, y, t, b)
    expected = reference_sigmoid(groups, duplicates, negative_weight, kept)
    assert_same(chunked, value_and_grads(expected, x, y, t, b))


@settings(max_examples=30, deadline=None)
@given(sizes, st.integers(1, 9), st.sampled_from(["positive", "masked"]), st.floats(0.5, 30.0))
def test_streaming_softmax_with_duplicate_captions_matches_the_per_pair_formula(
    size: tuple[int, int, int, int], ids: int, duplicates: str, scale: float
) -> None:
    batch, dim, chunk, seed = size
    x, y = features(batch, dim, seed)
    t = scalar(scale)
    groups = random_groups(batch, ids, seed)
    streamed = value_and_grads(
        lambda *a: softmax_loss(*a, chunk_size=chunk, groups=groups, duplicates=duplicates), x, y, t)
    assert_same(streamed, value_and_grads(reference_softmax(groups, duplicates), x, y, t))


@pytest.mark.parametrize("chunk", [1, 2])
def test_streaming_softmax_copes_with_rows_whose_first_tiles_are_all_masked(chunk: int) -> None:
    # Rows 1–3 share column 0's caption: their first tile holds only masked logits (−∞).
    x, y = features(6, 3, seed=25)
    t = scalar(20.0)
    groups = torch.tensor([0, 0, 0, 0, 1, 2])
    streamed = value_and_grads(
        lambda *a: softmax_loss(*a, chunk_size=chunk, groups=groups, duplicates="masked"), x, y, t)
    assert all(v.isfinite().all() for v in streamed)
    assert_same(streamed, value_and_grads(reference_softmax(groups, "masked"), x, y, t))


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("duplicates", ["negative", "positive", "masked"])
def test_without_duplicate_captions_every_option_is_exactly_the_papers_loss(
    duplicates: str, chunk: int | None
) -> None:
    x, y = features(8, 4, seed=26)
    t, b = scalar(6.0), scalar(-4.0)
    distinct = torch.tensor([17, 3, 8, 0, -5, 11, 2, 40])
    options = {"negative_weight": "balanced", "negative_mask_ratio": 0.3}
    plain = value_and_grads(lambda *a: sigmoid_loss(
        *a, chunk, **options, generator=torch.Generator().manual_seed(1)), x, y, t, b)
    with_ids = value_and_grads(lambda *a: sigmoid_loss(
        *a, chunk, **options, generator=torch.Generator().manual_seed(1), groups=distinct,
        duplicates=duplicates), x, y, t, b)
    assert all(torch.equal(a, e) for a, e in zip(with_ids, plain))
    plain = value_and_grads(lambda *a: softmax_loss(*a, chunk), x, y, t)
    with_ids = value_and_grads(
        lambda *a: softmax_loss(*a, chunk, groups=distinct, duplicates=duplicates), x, y, t)
    assert all(torch.equal(a, e) for a, e in zip(with_ids, plain))


@pytest.mark.parametrize("chunk", [None, 3])
def test_duplicates_as_negatives_ignore_the_groups(chunk: int | None) -> None:
    x, y = features(6, 4, seed=27)
    t, b = scalar(6.0), scalar(-4.0)
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    assert torch.equal(sigmoid_loss(x, y, t, b, chunk, groups=groups, duplicates="negative"),
                       sigmoid_loss(x, y, t, b, chunk))
    assert torch.equal(softmax_loss(x, y, t, chunk, groups=groups), softmax_loss(x, y, t, chunk))


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize(("duplicates", "weight"), [("positive", 0.6), ("masked", 0.4)])
def test_balanced_weights_count_only_pairs_of_different_captions(
    duplicates: str, weight: float, chunk: int | None
) -> None:
    # Captions a a b c: 16 pairs, 6 in the same caption (4 diagonal + 2), 10 negatives.
    # positive: 6 positives / 10 negatives; masked: 4 positives / 10 negatives.
    x, y = features(4, 3, seed=28)
    t, b = scalar(8.0), scalar(-1.0)
    groups = caption_groups(["a", "a", "b", "c"])
    same = same_caption(groups)
    balanced = value_and_grads(lambda *a: sigmoid_loss(
        *a, chunk, negative_weight="balanced", groups=groups, duplicates=duplicates), x, y, t, b)
    if duplicates == "positive":
        expected = lambda *a: per_pair_sigmoid(*a, lambda i, j: weight, same)  # noqa: E731
    else:
        expected = lambda *a: per_pair_sigmoid(*a, lambda i, j: 0.0 if same(i, j) else weight)  # noqa: E731
    assert_same(balanced, value_and_grads(expected, x, y, t, b))


@pytest.mark.parametrize("chunk", [None, 2])
def test_duplicates_as_positives_lower_the_sigmoid_loss_by_their_logits_over_b(chunk: int | None) -> None:
    # softplus(s) − softplus(−s) = s: turning a negative pair into a positive one changes the sum by −s.
    x, y = features(6, 4, seed=29)
    t, b = scalar(8.0), scalar(-3.0)
    groups = torch.tensor([0, 1, 0, 1, 2, 0])
    logits = (t * x @ y.t() + b).detach()
    duplicate = (groups[:, None] == groups[None, :]) & ~torch.eye(6, dtype=torch.bool)
    plain = sigmoid_loss(x, y, t, b, chunk).detach()
    positive = sigmoid_loss(x, y, t, b, chunk, groups=groups, duplicates="positive").detach()
    masked = sigmoid_loss(x, y, t, b, chunk, groups=groups, duplicates="masked").detach()
    torch.testing.assert_close(plain - positive, (logits * duplicate).sum() / 6, **TOL)
    torch.testing.assert_close(plain - masked, (F.softplus(logits) * duplicate).sum() / 6, **TOL)


def test_masking_duplicates_lowers_each_softmax_row_by_the_log_of_its_lost_denominator_share() -> None:
    x, y = features(5, 4, seed=30)
    t = scalar(6.0)
    groups = torch.tensor([0, 0, 1, 2, 2])
    logits = (t * x @ y.t()).detach()
    keep = ~((groups[:, None] == groups[None, :]) & ~torch.eye(5, dtype=torch.bool))
    # Each cross-entropy is lse − positive: masking lowers it by lse(all) − lse(kept).
    lost_rows = logits.logsumexp(1) - logits.masked_fill(~keep, -torch.inf).logsumexp(1)
    lost_cols = logits.logsumexp(0) - logits.masked_fill(~keep, -torch.inf).logsumexp(0)
    plain = softmax_loss(x, y, t, 2).detach()
    masked = softmax_loss(x, y, t, 2, groups=groups, duplicates="masked").detach()
    torch.testing.assert_close(plain - masked, (lost_rows.mean() + lost_cols.mean()) / 2, **TOL)
    assert (lost_rows[[2]] == 0).all()  # a caption of its own loses nothing


@pytest.mark.parametrize("chunk", [None, 3])
def test_with_equal_features_for_equal_captions_positive_duplicates_leave_the_softmax_loss_unchanged(
    chunk: int | None
) -> None:
    # As in training: one text embedding per caption, so duplicate rows' text features are equal.
    # The gradients reach the images, the caption embeddings and t.
    groups = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    images, captions = features(7, 5, seed=31)[0], features(4, 5, seed=32)[0]
    t = scalar(7.0)
    loss = lambda duplicates: lambda x, e, t: softmax_loss(  # noqa: E731
        x, e[groups], t, chunk, groups=groups, duplicates=duplicates)
    plain = value_and_grads(loss("negative"), images, captions, t)
    assert_same(value_and_grads(loss("positive"), images, captions, t), plain)
    masked = value_and_grads(loss("masked"), images, captions, t)
    assert masked[0] < plain[0] - 0.1  # masking does change it: each row loses copies of exp(s_ii)
    assert not torch.allclose(masked[2], plain[2])


def test_caption_groups_give_equal_captions_the_same_id_in_order_of_first_appearance() -> None:
    groups = caption_groups(["a red circle", "a blue square", "a red circle", "", "a blue square"])
    assert groups.dtype == torch.long
    assert groups.tolist() == [0, 1, 0, 2, 1]


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


@pytest.mark.parametrize("duplicates", ["negative", "positive", "masked"])
@pytest.mark.parametrize("loss", [sigmoid_loss, softmax_loss])
def test_tiled_losses_stay_finite_and_exact_at_extreme_logits(
    loss: Callable[..., torch.Tensor], duplicates: str
) -> None:
    # t = 1000 puts logits at ±1000, far past float32's exp overflow at 88.
    x, y = features(10, 3, seed=8, dtype=torch.float32)
    t = scalar(1000.0, torch.float32)
    options = {"groups": torch.tensor([0, 1, 0, 2, 3, 1, 0, 4, 5, 6]), "duplicates": duplicates}
    tiled = value_and_grads(lambda *a: loss(*a, chunk_size=3, **options), x, y, t)
    naive = value_and_grads(lambda *a: loss(*a, **options), x, y, t)
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
    lambda x, y, t, b: sigmoid_loss(x, y, t, b, 8, groups=torch.arange(64) // 2, duplicates="positive"),
    lambda x, y, t, b: sigmoid_loss(x, y, t, b, 8, negative_weight="balanced", negative_mask_ratio=0.5,
                                    groups=torch.arange(64) // 2, duplicates="masked"),
    lambda x, y, t, b: softmax_loss(x, y, t, 8, groups=torch.arange(64) // 2, duplicates="positive"),
    lambda x, y, t, b: softmax_loss(x, y, t, 8, groups=torch.arange(64) // 2, duplicates="masked"),
], ids=["masked sigmoid", "balanced sigmoid", "softmax", "sigmoid duplicates positive",
        "sigmoid duplicates masked", "softmax duplicates positive", "softmax duplicates masked"])
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
    (lambda x: sigmoid_loss(x, x, 1.0, groups=torch.arange(4), duplicates="both"),
     "duplicates='both': use 'negative', 'positive' or 'masked'"),
    (lambda x: softmax_loss(x, x, 1.0, groups=torch.arange(3), duplicates="masked"),
     r"shape \(4,\); got torch.int64 of shape \(3,\)"),
    (lambda x: softmax_loss(x, x, 1.0, groups=torch.zeros(4), duplicates="positive"),
     "integer caption id per row"),
])
def test_bad_arguments_are_rejected_with_the_value_and_the_fix(
    call: Callable[[torch.Tensor], torch.Tensor], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(torch.ones(4, 3))


# --- the study file's loss.duplicates (scalestudy.spec.LossSpec) ---------------------------


def test_the_loss_spec_counts_duplicate_captions_as_negatives_unless_told() -> None:
    assert LossSpec().duplicates == "negative"
    assert LossSpec(kind="softmax", duplicates="masked").duplicates == "masked"
    assert LossSpec(duplicates="positive", negative_weight=0).duplicates == "positive"
    masked = LossSpec(duplicates="masked", negative_weight="balanced", negative_mask_ratio=0.5)
    assert masked.duplicates == "masked"


def test_masked_duplicates_without_negative_weight_are_rejected_as_changing_nothing() -> None:
    with pytest.raises(ValidationError,
                       match=r"loss.duplicates=masked changes nothing with loss.negative_weight=0"):
        LossSpec(duplicates="masked", negative_weight=0)


def test_positive_duplicates_for_the_softmax_loss_are_rejected_as_changing_nothing() -> None:
    with pytest.raises(ValidationError,
                       match="loss.duplicates=positive changes nothing for loss.kind=softmax"):
        LossSpec(kind="softmax", duplicates="positive")


def test_an_unknown_duplicates_option_names_the_three_that_exist() -> None:
    with pytest.raises(ValidationError, match="'negative', 'positive' or 'masked'"):
        LossSpec(duplicates="ignore")

"""Contrastive image–text losses as pure functions: CLIP's softmax and SigLIP's sigmoid.

All take L2-normalised features of shape (B, D), row i of each being a positive pair, and the
logit scale t as the multiplier itself (not log t). Each loss has two forms with the same value
and gradients (wrt both features, t and b):

- the naive formula (``chunk_size=None``): the B×B logits through plain autograd, the reference;
- the tiled form (``chunk_size=c``): logits in tiles of at most c×c, never the whole B×B matrix.
  One custom autograd Function computes the value *and* the gradients tile by tile in forward
  (three B×D×B matrix products in all, as many as the naive forward + backward) and keeps only
  the B×D gradients; backward scales them by the incoming gradient. Recomputing the tiles in
  backward instead would cost a fourth product, a floor of 4/3 on the time of the bare products
  (benchmarks/README.md, ## Losses). The loss is a scalar at the end of the graph, so the early
  gradient work is wasted only if backward never runs: it is done only when autograd records
  (grad enabled and an input requires grad). Tiles are computed in float32, or float64 for
  float64 inputs, and the results cast back to the inputs' dtypes. First-order gradients only.

Rows with the same caption (the same ``groups`` id) are, by the papers' formulas, each other's
negatives — false negatives. ``duplicates`` chooses what such pairs are: ``"negative"`` (the
papers' loss, the default), ``"positive"`` or ``"masked"`` (left out); see `sigmoid_loss` and
`softmax_loss`. Ids are of the *global* batch's rows, so every tile, and every data-parallel
rank, compares the ids of its rows and columns. With no two ids equal, every option computes
exactly the papers' loss (the same code path).

The tile kernels and the autograd glue below are the building blocks the data-parallel forms in
scalestudy.distributed_losses reuse; the public API is ``__all__``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["softmax_loss", "sigmoid_loss", "negative_mask", "caption_groups", "NegativeWeight",
           "Duplicates"]

NegativeWeight = float | Literal["balanced"] | None
Duplicates = Literal["negative", "positive", "masked"]
DUPLICATES: tuple[str, ...] = ("negative", "positive", "masked")

_M32 = 0xFFFFFFFF


# --- rows with the same caption ---------------------------------------------------------------


def caption_groups(captions: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Group ids of a batch's captions for the losses' ``groups``: equal captions share an id, and
    ids count the distinct captions in order of first appearance (0, 1, …).

    >>> caption_groups(["a red circle", "a blue square", "a red circle"]).tolist()
    [0, 1, 0]
    """
    first = {caption: index for index, caption in enumerate(dict.fromkeys(captions))}
    return torch.tensor([first[caption] for caption in captions], dtype=torch.long, device=device)


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity, never field by field
class Groups:
    """The caption groups of the global batch's rows, when some rows share one and are not negatives.

    ``ids`` are dense (0 … K−1) per global row, ``counts`` the rows in each group and
    ``same_pairs`` = Σ_k counts_k², the number of ordered pairs (i, j) in the same group, i = j
    included.
    """

    mode: Literal["positive", "masked"]
    ids: torch.Tensor
    counts: torch.Tensor
    same_pairs: int

    def same(
        self, row_start: int, n_rows: int, col_start: int, n_cols: int, diagonal: bool = True
    ) -> torch.Tensor:
        """Bool tile: whether global rows/columns [start, start+n) are in the same group.

        ``diagonal=False`` clears the pairs of a row with itself (i = j).
        """
        rows = self.ids[row_start:row_start + n_rows]
        same = rows.unsqueeze(1) == self.ids[col_start:col_start + n_cols].unsqueeze(0)
        if not diagonal:
            torch.diagonal(same, row_start - col_start).fill_(False)
        return same


def resolve_groups(
    groups: torch.Tensor | None, duplicates: str, batch_size: int, device: torch.device
) -> Groups | None:
    """The loss's duplicate-caption option; None when the papers' loss is computed unchanged.

    That is when duplicates are negatives, no ids are given, or no two ids are equal: the same
    code path as without groups, so the values are exactly the same.
    """
    if duplicates not in DUPLICATES:
        raise ValueError(f"duplicates={duplicates!r}: use 'negative', 'positive' or 'masked'")
    if groups is None:
        return None
    if (groups.shape != (batch_size,) or groups.dtype.is_floating_point or groups.dtype.is_complex
            or groups.dtype == torch.bool):
        raise ValueError(
            f"groups: expected one integer caption id per row of the (global) batch, shape "
            f"({batch_size},); got {groups.dtype} of shape {tuple(groups.shape)}"
        )
    if duplicates == "negative":
        return None
    _, ids, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    if counts.numel() == batch_size:
        return None
    same_pairs = int((counts * counts).sum())
    return Groups(duplicates, ids.to(device), counts.to(device), same_pairs)  # type: ignore[arg-type]


# --- which negatives count, and how much ------------------------------------------------------


@dataclass(frozen=True)
class Negatives:
    """How the sigmoid loss weighs its negative pairs; positives always weigh 1.

    Each negative term is multiplied by ``weight``; with ``mask_ratio`` > 0 each negative pair is
    also dropped with that probability, decided by a hash of (seed, i, j) over *global* indices,
    so every tiling and every data-parallel split drops the same pairs. With ``groups``, pairs of
    rows in the same caption group are positives (weight 1, always kept) or dropped (weight 0).
    """

    weight: float = 1.0
    mask_ratio: float = 0.0
    seed: int = 0
    groups: Groups | None = None

    @property
    def plain(self) -> bool:
        return self.weight == 1.0 and self.mask_ratio == 0.0 and self.groups is None


def resolve_negatives(
    batch_size: int,
    negative_weight: NegativeWeight,
    negative_mask_ratio: float,
    generator: torch.Generator | None,
    groups: Groups | None = None,
) -> Negatives:
    """The sigmoid loss's negative-pair options as numbers; draws the mask seed if masking.

    ``"balanced"`` is (number of positive pairs) / (number of negative pairs) before random
    masking, so both kinds weigh the same in total: 1/(B−1) for the papers' loss; with
    duplicate captions only the pairs of different captions are negatives (B² − Σ_k n_k² of
    them, n_k the rows of caption k), and the positives are B, or Σ_k n_k² when duplicates are
    positives.
    """
    if negative_weight == "balanced" and groups is not None:
        negative_pairs = batch_size * batch_size - groups.same_pairs
        positive_pairs = groups.same_pairs if groups.mode == "positive" else batch_size
        # One caption for the whole batch leaves no negative: the weight is then never used.
        weight = positive_pairs / negative_pairs if negative_pairs else 1.0
    elif negative_weight == "balanced":
        weight = 1.0 / max(batch_size - 1, 1)
    elif negative_weight is None:
        weight = 1.0
    elif isinstance(negative_weight, str) or not (math.isfinite(negative_weight) and negative_weight >= 0):
        raise ValueError(
            f"negative_weight={negative_weight!r}: use a finite number >= 0, 'balanced' or None"
        )
    else:
        weight = float(negative_weight)
    if not 0.0 <= negative_mask_ratio < 1.0:
        raise ValueError(f"negative_mask_ratio={negative_mask_ratio}: use a fraction in [0, 1)")
    if negative_mask_ratio == 0.0:
        return Negatives(weight, groups=groups)
    # One draw per call: the mask is a pure function of this seed, so a generator in a known
    # state reproduces it exactly, and the RNG is untouched when nothing is masked.
    seed = int(torch.randint(0, 2**32, (), generator=generator))
    return Negatives(weight, negative_mask_ratio, seed, groups)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for x in [0, 2³²), in 16-bit halves so int64 never overflows."""
    low, high = x & 0xFFFF, x >> 16
    return (low * c + (((high * c) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection whose output bits each depend on every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _kept_pairs(rows: torch.Tensor, cols: torch.Tensor, negatives: Negatives) -> torch.Tensor:
    """Bool tile: whether pair (rows[a], cols[b]) survives masking (its hash clears the ratio)."""
    row_keys = _fmix32(rows ^ negatives.seed)
    hashed = _fmix32(row_keys.unsqueeze(1) ^ cols.unsqueeze(0))
    return hashed >= int(negatives.mask_ratio * 2**32)


def _pair_tile(
    row_start: int, n_rows: int, col_start: int, n_cols: int, negatives: Negatives,
    dtype: torch.dtype, device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weights and positives of the pairs of global rows/columns [start, start+n).

    Weights: None when all are 1. Positives: a bool tile when duplicate captions are positives,
    None when the positives are the diagonal i = j alone. The random mask comes first, so a
    duplicate pair is a positive or dropped whatever the hash says.
    """
    if negatives.plain:
        return None, None
    groups = negatives.groups
    same = None if groups is None else groups.same(row_start, n_rows, col_start, n_cols)
    positives = same if groups is not None and groups.mode == "positive" else None
    if positives is not None and negatives.weight == 1.0 and negatives.mask_ratio == 0.0:
        return None, positives  # every pair weighs 1
    weights = torch.full((n_rows, n_cols), negatives.weight, dtype=dtype, device=device)
    if negatives.mask_ratio > 0:
        rows = torch.arange(row_start, row_start + n_rows, device=device)
        cols = torch.arange(col_start, col_start + n_cols, device=device)
        weights.mul_(_kept_pairs(rows, cols, negatives))
    if same is not None:
        weights.masked_fill_(same, 1.0 if positives is not None else 0.0)
    torch.diagonal(weights, row_start - col_start).fill_(1.0)
    return weights, positives


def negative_mask(
    batch_size: int, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The B×B bool matrix of pairs `sigmoid_loss(..., negative_mask_ratio=ratio)` keeps.

    Given a generator in the same state, this is exactly the random mask the loss applies
    (positives are always kept; duplicate captions are not considered here). For inspection and
    tests; the tiled loss computes it tile by tile instead.
    """
    negatives = resolve_negatives(batch_size, None, ratio, generator)
    weights, _ = _pair_tile(0, batch_size, 0, batch_size, negatives, torch.float32, torch.device("cpu"))
    return torch.ones(batch_size, batch_size, dtype=torch.bool) if weights is None else weights > 0


# --- tiled kernels ----------------------------------------------------------------------------


@dataclass
class TileGrads:
    """Raw gradient sums of Σ_ij G_ij · f(s_ij) where s_ij = t xᵢ·yⱼ (+ b) and G = ∂/∂s.

    ``x`` accumulates G Y and ``y`` accumulates Gᵀ X; the feature gradients are t times these,
    ∂/∂t is Σ X ∘ (G Y) (so it needs no B×B work) and ∂/∂b is Σ G.
    """

    x: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor

    @classmethod
    def zeros(cls, x: torch.Tensor, y: torch.Tensor) -> TileGrads:
        return cls(torch.zeros_like(x), torch.zeros_like(y), x.new_zeros(()))

    def add(self, g: torch.Tensor, x: torch.Tensor, y: torch.Tensor, i0: int, j0: int) -> None:
        self.x[i0:i0 + g.shape[0]].addmm_(g, y)
        self.y[j0:j0 + g.shape[1]].addmm_(g.t(), x)
        self.logits.add_(g.sum())  # in place: data-parallel hops share this sum


def _tiles(n: int, m: int, chunk: int) -> list[tuple[int, int, int, int]]:
    """(i0, i1, j0, j1) of the tiles of an n×m matrix, column chunk by column chunk."""
    return [(i0, min(i0 + chunk, n), j0, min(j0 + chunk, m))
            for j0 in range(0, m, chunk) for i0 in range(0, n, chunk)]


def _tile_logits(
    buffer: torch.Tensor, xt: torch.Tensor, y: torch.Tensor, tile: tuple[int, int, int, int]
) -> torch.Tensor:
    """t · x[i0:i1] @ y[j0:j1]ᵀ written into the one reused buffer (no allocation per tile)."""
    i0, i1, j0, j1 = tile
    out = buffer[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
    return torch.mm(xt[i0:i1], y[j0:j1].t(), out=out)


def _softplus(s: torch.Tensor) -> torch.Tensor:
    """log(1 + eˢ). Above its threshold softplus returns s itself, dropping log1p(e⁻ˢ) < e⁻ˢ:
    torch's default threshold, 20, drops at most 2e-9, far below float32's resolution at 20
    (1.9e-6) but not float64's (3.6e-15), so float64 switches at 40 (e⁻⁴⁰ ≈ 4e-18)."""
    return F.softplus(s, threshold=40.0 if s.dtype == torch.float64 else 20.0)


def sigmoid_tiles(
    x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, b: torch.Tensor | None,
    row_start: int, col_start: int, negatives: Negatives, chunk: int, grads: TileGrads | None,
) -> torch.Tensor:
    """Σ_ij w_ij · −log σ(z_ij (t xᵢ·yⱼ + b)) over x's rows and y's rows, un-normalised.

    x and y hold the global rows [row_start, …) and [col_start, …); z_ij = +1 where the global
    indices agree (positives), or where the caption groups do when duplicates are positives, −1
    elsewhere (SigLIP, Zhai et al. 2023, Algorithm 1). Adds the raw gradients into ``grads``
    when given: ∂/∂s_ij = w_ij σ(s_ij) − [z_ij = +1], since −log σ(−s) = softplus(s) for
    negatives and −log σ(s) = softplus(−s) for positives (weight 1).
    Peak memory: two chunk×chunk tiles (three with re-weighted or masked negatives, four and a
    bool tile with duplicate captions).
    """
    xt = x * t
    buffer = x.new_empty(min(chunk, x.shape[0]) * min(chunk, y.shape[0]))
    total = x.new_zeros(())
    for tile in _tiles(x.shape[0], y.shape[0], chunk):
        i0, i1, j0, j1 = tile
        s = _tile_logits(buffer, xt, y, tile)
        if b is not None:
            s.add_(b)
        weights, same = _pair_tile(row_start + i0, i1 - i0, col_start + j0, j1 - j0, negatives,
                                   s.dtype, s.device)
        if same is not None:  # duplicate captions are positives: z_ij = +1 off the diagonal too
            z = same.to(s.dtype)
            # −z·s exactly (s − 2s = −s), so positives are softplus(−s) directly, as below.
            terms = _softplus(torch.addcmul(s, s, z, value=-2.0))
            total += (terms if weights is None else terms.mul_(weights)).sum()
            if grads is not None:
                g = s.sigmoid_() if weights is None else s.sigmoid_().mul_(weights)
                grads.add(g.sub_(z), x[i0:i1], y[j0:j1], i0, j0)
            continue
        positives = torch.diagonal(s, (row_start + i0) - (col_start + j0))
        terms = _softplus(s) if weights is None else _softplus(s).mul_(weights)
        # Positives directly as softplus(−s): softplus(s) − s cancels to 0 once softplus switches
        # to its linear branch (s > 20), and loses float32 digits well before that.
        torch.diagonal(terms, (row_start + i0) - (col_start + j0)).copy_(_softplus(-positives))
        total += terms.sum()
        if grads is None:
            continue
        g = s.sigmoid_()  # in place: `positives` now views σ(s_ii), whose weight is 1
        if weights is not None:
            g.mul_(weights)
        positives.sub_(1.0)
        grads.add(g, x[i0:i1], y[j0:j1], i0, j0)
    return total


def _online_logsumexp(
    running_max: torch.Tensor, running_sum: torch.Tensor, s: torch.Tensor, dim: int,
    scratch: torch.Tensor,
) -> None:
    """Fold one tile into a running log-sum-exp along ``dim`` (Milakov & Gimelshein 2018).

    The state (max m, Σ exp(s − m)) is rescaled whenever a tile raises the max, so no exp
    overflows and the B×B logits never exist at once. Logits of −∞ (left out of the softmax)
    add nothing, even while a row has seen no other: its max stays −∞ and is shifted by a finite
    number instead, as −∞ − (−∞) would be NaN.
    """
    new_max = torch.maximum(running_max, s.amax(dim))
    shift = new_max.clamp(min=torch.finfo(s.dtype).min)  # = new_max wherever it is finite
    running_sum.mul_((running_max - shift).exp_())
    shifted = torch.sub(s, shift.unsqueeze(dim), out=scratch[: s.numel()].view_as(s))
    running_sum.add_(shifted.exp_().sum(dim))
    running_max.copy_(new_max)


def _group_targets(
    x: torch.Tensor, y: torch.Tensor, row_start: int, col_start: int, groups: Groups,
    over_rows: bool, over_cols: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x, the mean of y's rows in its caption group, and per row of y that of x's rows.

    Group sums, O(B·D): a row's mean positive logit is t xᵢ · mean_{j ∈ G(i)} yⱼ, no tile needed.
    Means divide by the group's size in the global batch, so a direction needs all the rows of
    the other side (a data-parallel rank's x are its own rows: their sums feed only the gradient
    of y, where the ranks' parts add up).
    """
    batch = groups.ids.shape[0]
    whole_columns, whole_rows = (col_start, y.shape[0]) == (0, batch), (row_start, x.shape[0]) == (0, batch)
    if (over_rows and not whole_columns) or (over_cols and not whole_rows):
        raise ValueError("softmax_tiles: with duplicate captions as positives, every row scored "
                         "needs the whole batch as its columns")
    row_ids = groups.ids[row_start:row_start + x.shape[0]]
    col_ids = groups.ids[col_start:col_start + y.shape[0]]
    sizes = groups.counts.to(x.dtype).unsqueeze(1)
    k = groups.counts.shape[0]
    x_means = x.new_zeros(k, x.shape[1]).index_add_(0, row_ids, x).div_(sizes)
    y_means = y.new_zeros(k, y.shape[1]).index_add_(0, col_ids, y).div_(sizes)
    return y_means[row_ids], x_means[col_ids]


def softmax_tiles(
    x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, row_start: int, col_start: int,
    over_rows: bool, over_cols: bool, chunk: int, grads: TileGrads | None,
    groups: Groups | None = None,
) -> torch.Tensor:
    """Sums of softmax cross-entropies of s = t X Yᵀ, un-normalised, streamed over tiles.

    ``over_rows``: each row of x against all of y (image→text when x are images);
    ``over_cols``: each row of y against all of x. Positives are the pairs whose global indices
    (x from row_start, y from col_start) agree; every row (column) needs its positive present.
    Pass 1 keeps an online log-sum-exp per row and per column; pass 2 recomputes each tile for
    the gradient ∂/∂s_ij = softmax_row(s)_ij + softmax_col(s)_ij − 2[i = j] (one term per
    direction asked for). Peak memory: two chunk×chunk tiles plus O(B) statistics.

    ``groups`` (duplicate captions): ``"masked"`` sets the logits of same-group pairs i ≠ j to
    −∞ in both passes (a bool tile more); ``"positive"`` makes the target uniform over row i's
    group G(i): the cross-entropy is lse_i − mean_{j∈G(i)} s_ij and the target term of the
    gradient −[j ∈ G(i)]/|G(i)| is added from group means (`_group_targets`), not per tile.
    """
    xt = x * t
    n, m = x.shape[0], y.shape[0]
    buffer = x.new_empty(min(chunk, n) * min(chunk, m))
    scratch = torch.empty_like(buffer)
    row_max, row_sum = x.new_full((n,), -math.inf), x.new_zeros(n)
    col_max, col_sum = x.new_full((m,), -math.inf), x.new_zeros(m)
    masked = groups if groups is not None and groups.mode == "masked" else None

    def logits(tile: tuple[int, int, int, int]) -> torch.Tensor:
        s = _tile_logits(buffer, xt, y, tile)
        if masked is not None:
            i0, i1, j0, j1 = tile
            duplicates = masked.same(row_start + i0, i1 - i0, col_start + j0, j1 - j0, diagonal=False)
            s.masked_fill_(duplicates, -math.inf)
        return s

    tiles = _tiles(n, m, chunk)
    for tile in tiles:
        i0, i1, j0, j1 = tile
        s = logits(tile)
        if over_rows:
            _online_logsumexp(row_max[i0:i1], row_sum[i0:i1], s, 1, scratch)
        if over_cols:
            _online_logsumexp(col_max[j0:j1], col_sum[j0:j1], s, 0, scratch)
    row_lse, col_lse = row_max + row_sum.log(), col_max + col_sum.log()

    # Positive logits straight from the paired rows: O(B·D), no tile needed.
    lo, hi = max(row_start, col_start), min(row_start + n, col_start + m)
    if (over_rows and hi - lo != n) or (over_cols and hi - lo != m):
        raise ValueError("softmax_tiles: every row scored needs its positive among the columns")
    targets = None
    if groups is not None and groups.mode == "positive":
        targets = _group_targets(x, y, row_start, col_start, groups, over_rows, over_cols)
        row_positives = (xt * targets[0]).sum(1)
        col_positives = (y * t * targets[1]).sum(1)
    else:
        paired = slice(lo - row_start, hi - row_start), slice(lo - col_start, hi - col_start)
        row_positives = col_positives = (xt[paired[0]] * y[paired[1]]).sum(1)
    # Each cross-entropy as (max − positive) + log Σ exp(s − max): the positive is usually the
    # max, so this keeps float32's digits where lse − positive would cancel them away.
    total = x.new_zeros(())
    if over_rows:
        total += (row_max - row_positives).sum() + row_sum.log().sum()
    if over_cols:
        total += (col_max - col_positives).sum() + col_sum.log().sum()
    if grads is None:
        return total

    directions = int(over_rows) + int(over_cols)
    for tile in tiles:
        i0, i1, j0, j1 = tile
        s = logits(tile)
        if over_rows and over_cols:
            from_rows = torch.sub(s, row_lse[i0:i1, None], out=scratch[: s.numel()].view_as(s))
            g = s.sub_(col_lse[None, j0:j1]).exp_().add_(from_rows.exp_())
        elif over_rows:
            g = s.sub_(row_lse[i0:i1, None]).exp_()
        else:
            g = s.sub_(col_lse[None, j0:j1]).exp_()
        if targets is None:
            torch.diagonal(g, (row_start + i0) - (col_start + j0)).sub_(directions)
        grads.add(g, x[i0:i1], y[j0:j1], i0, j0)
    if targets is not None:
        # −Σ_ij [j ∈ G(i)]/|G(i)| yⱼ per row i is minus the group mean (and likewise for y); each
        # direction asked for adds the same, as the groups are symmetric.
        grads.x.sub_(targets[0], alpha=directions)
        grads.y.sub_(targets[1], alpha=directions)
    return total


# --- the autograd glue ------------------------------------------------------------------------


class LossAndGrads(NamedTuple):
    """A loss value and, when asked for, its gradients shaped and typed like the inputs."""

    loss: torch.Tensor
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Tiles run in float32, or float64 for float64 inputs: low-precision sums drift."""
    return torch.promote_types(x.dtype, torch.float32)


def as_scalar(value: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if value is None else value.detach().reshape(()).to(dtype)


def finish_grads(
    raw: TileGrads, x: torch.Tensor, t: torch.Tensor, like: tuple[torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor | None], norm: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Turn raw tile sums into ∂loss/∂(x, y, t, b) for loss = Σ / norm, typed like ``like``."""
    x_like, y_like, t_like, b_like = like
    grad_x = (raw.x * (t / norm)).to(x_like.dtype)
    grad_y = (raw.y * (t / norm)).to(y_like.dtype)
    grad_t = ((x * raw.x).sum() / norm).reshape(t_like.shape).to(t_like.dtype)
    grad_b = None if b_like is None else (raw.logits / norm).reshape(b_like.shape).to(b_like.dtype)
    return grad_x, grad_y, grad_t, grad_b


Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", bool], LossAndGrads]


class _GradientsInForward(torch.autograd.Function):
    """Runs a kernel that returns the value and its gradients; backward only scales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, kernel: Kernel, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
        b: torch.Tensor | None,
    ) -> torch.Tensor:
        result = kernel(x, y, t, b, True)
        ctx.grads = result[1:]  # type: ignore[attr-defined]
        return result.loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *(None if g is None else grad * g for g in ctx.grads))


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on these tensors (so a backward may follow)."""
    return torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in tensors)


def apply_kernel(
    kernel: Kernel, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, b: torch.Tensor | None
) -> torch.Tensor:
    """The kernel's value, differentiable when autograd records (else no gradient work)."""
    if records_grad(x, y, t, b):
        return _GradientsInForward.apply(kernel, x, y, t, b)
    return kernel(x, y, t, b, False).loss


def _sigmoid_kernel(
    x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, b: torch.Tensor | None, need_grad: bool,
    *, negatives: Negatives, chunk: int,
) -> LossAndGrads:
    dtype = compute_dtype(x)
    xc, yc = x.to(dtype), y.to(dtype)
    tc, bc = as_scalar(t, dtype), as_scalar(b, dtype)
    raw = TileGrads.zeros(xc, yc) if need_grad else None
    total = sigmoid_tiles(xc, yc, tc, bc, 0, 0, negatives, chunk, raw)
    loss = (total / x.shape[0]).to(x.dtype)
    if raw is None:
        return LossAndGrads(loss)
    return LossAndGrads(loss, *finish_grads(raw, xc, tc, (x, y, t, b), x.shape[0]))


def softmax_kernel(
    x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, b: None, need_grad: bool, *, chunk: int,
    row_start: int = 0, over_cols: bool = True, norm: float | None = None,
    groups: Groups | None = None,
) -> LossAndGrads:
    """`softmax_tiles` / ``norm`` (default 2B: the mean of two directions' means), with grads.

    The single-process loss takes both directions over x and y; a data-parallel rank passes its
    own rows as x (global rows from ``row_start``), the gathered batch as y, ``over_cols=False``
    and the global 2B as ``norm``. ``groups`` are those of the global batch.
    """
    dtype = compute_dtype(x)
    xc, yc, tc = x.to(dtype), y.to(dtype), as_scalar(t, dtype)
    raw = TileGrads.zeros(xc, yc) if need_grad else None
    total = softmax_tiles(xc, yc, tc, row_start, 0, True, over_cols, chunk, raw, groups)
    norm = 2 * x.shape[0] if norm is None else norm
    loss = (total / norm).to(x.dtype)
    if raw is None:
        return LossAndGrads(loss)
    return LossAndGrads(loss, *finish_grads(raw, xc, tc, (x, y, t, None), norm))


# --- the public losses ------------------------------------------------------------------------


def check_features(image_features: torch.Tensor, text_features: torch.Tensor, chunk_size: int | None) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"features must be two (B, D) matrices of the same shape; got image "
            f"{tuple(image_features.shape)} and text {tuple(text_features.shape)}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: use a positive number of rows/columns, or None")


def softmax_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    chunk_size: int | None = None,
    *,
    groups: torch.Tensor | None = None,
    duplicates: Duplicates = "negative",
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss (Radford et al. 2021, §2.3 and Fig. 3 pseudo-code).

    The mean of the image→text and text→image cross-entropies over the B×B logits
    ``t · I Tᵀ`` with the diagonal as targets.

    ``groups``: a caption id per row (`caption_groups`; equal ids = the same caption), and
    ``duplicates`` what rows i ≠ j of the same caption are to each other:

    - ``"negative"`` (default): the paper's loss, ``groups`` unused;
    - ``"positive"``: multi-positive cross-entropy — row i's target is uniform over the columns
      G(i) of its caption group: −Σ_{j∈G(i)} log softmax(s_i)_j / |G(i)|, in both directions
      (a caption's rows are the targets of each of its images and vice versa);
    - ``"masked"``: the same-caption columns j ≠ i are left out of row i's softmax (and the
      same-caption rows out of column j's), so the diagonal competes only with other captions.

    With no two ids equal all three are the paper's loss exactly. When equal captions have equal
    text features (a deterministic text tower, as in this project's trainer), ``"positive"`` *is*
    the paper's loss, in value and in the gradients reaching both towers and t: the paper's
    image→text softmax already spreads each image's target over its caption's identical columns,
    and those columns together already target all of the caption's images. Only ``"masked"``
    then changes training: each row's denominator loses the copies of its positive's exp(s_ii).

    ``chunk_size=None``: the naive formula; peak memory a handful of B×B tensors (logits, two
    log-softmaxes and their gradients). ``chunk_size=c``: streaming softmax — an online
    log-sum-exp over c×c tiles for both directions, then a second pass over the tiles for the
    gradients; peak memory two c×c tiles plus the B×D gradients (and a bool tile when masking
    duplicates); same value and gradients.

    >>> _ = torch.manual_seed(0)
    >>> x = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    >>> bool(torch.isclose(softmax_loss(x, x, torch.tensor(10.0)),
    ...                    softmax_loss(x, x, torch.tensor(10.0), chunk_size=3)))
    True
    """
    check_features(image_features, text_features, chunk_size)
    batch = image_features.shape[0]
    same_caption = resolve_groups(groups, duplicates, batch, image_features.device)
    if chunk_size is None:
        logits = logit_scale * image_features @ text_features.t()
        labels = torch.arange(logits.shape[0], device=logits.device)
        if same_caption is None:
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        if same_caption.mode == "masked":
            logits = logits.masked_fill(same_caption.same(0, batch, 0, batch, diagonal=False), -math.inf)
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        same = same_caption.same(0, batch, 0, batch).to(logits.dtype)
        # Row i's target |G(i)|⁻¹ on its group; the groups are symmetric, so columns likewise.
        targets = same / same.sum(1, keepdim=True)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets.t()))
    kernel = functools.partial(softmax_kernel, chunk=chunk_size, groups=same_caption)
    return apply_kernel(kernel, image_features, text_features, torch.as_tensor(logit_scale), None)


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    *,
    negative_weight: NegativeWeight = None,
    negative_mask_ratio: float = 0.0,
    generator: torch.Generator | None = None,
    groups: torch.Tensor | None = None,
    duplicates: Duplicates = "negative",
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, §3.1 and Algorithm 1).

    ``Σ_ij w_ij · −log σ(z_ij (t xᵢ·yⱼ + b)) / B`` with z_ij = +1 for positives (the diagonal)
    and −1 for negatives: every pair is an independent binary problem, normalised by the batch
    size B (not B², and not the number of pairs kept). Positives weigh w = 1; each negative
    weighs w_ij = ``negative_weight``, times 0 if masked.

    - ``logit_bias=None``: the bias-free variant (b = 0).
    - ``negative_weight``: None (1, the paper's loss), a number ≥ 0, or ``"balanced"`` = (number
      of positive pairs) / (number of negative pairs), so positives and negatives weigh the
      same in total: 1/(B−1) in the paper's loss. SigLIP §3.2 explains that the many negatives
      dominate the loss at the start and counters it with the bias init b = −10; re-weighting
      is the bias-free answer to the same imbalance.
    - ``negative_mask_ratio`` = r: each negative pair is dropped (w_ij = 0) with probability r,
      independently per pair; the sum stays normalised by B. This is SigLIP §4.7's study of the
      positive:negative ratio. The mask is a hash of one seed drawn from ``generator`` (the
      global RNG if None) and the pair's indices, so it is deterministic given the generator's
      state, identical for every ``chunk_size``, and shown by `negative_mask`.
    - ``groups``: a caption id per row (`caption_groups`; equal ids = the same caption), and
      ``duplicates`` what rows i ≠ j of the same caption are to each other: ``"negative"`` (the
      paper's loss, ``groups`` unused), ``"positive"`` (z_ij = +1, weight 1, never masked) or
      ``"masked"`` (w_ij = 0). Only pairs of different captions are then negatives: they alone
      take ``negative_weight`` and the random mask, and ``"balanced"`` counts them alone —
      B² − Σ_k n_k² negatives (n_k rows of caption k) against B positives (masked) or Σ_k n_k²
      (positive). With no two ids equal all three are the paper's loss exactly.

    ``chunk_size=None``: the naive formula; peak memory a handful of B×B tensors.
    ``chunk_size=c``: the chunked sigmoid — c×c tiles, value and gradients together (see the
    module docstring); peak memory two c×c tiles (three with weighted or masked negatives, four
    and a bool tile with duplicate captions) plus the B×D gradients; same value and gradients.

    >>> _ = torch.manual_seed(0)
    >>> x = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    >>> t, b = torch.tensor(10.0), torch.tensor(-10.0)
    >>> bool(torch.isclose(sigmoid_loss(x, x, t, b), sigmoid_loss(x, x, t, b, chunk_size=3)))
    True
    """
    check_features(image_features, text_features, chunk_size)
    batch = image_features.shape[0]
    same_caption = resolve_groups(groups, duplicates, batch, image_features.device)
    negatives = resolve_negatives(batch, negative_weight, negative_mask_ratio, generator, same_caption)
    if chunk_size is None:
        logits = logit_scale * image_features @ text_features.t()
        if logit_bias is not None:
            logits = logits + logit_bias
        weights, positives = _pair_tile(0, batch, 0, batch, negatives, logits.dtype, logits.device)
        if positives is None:
            signs = 2 * torch.eye(batch, device=logits.device, dtype=logits.dtype) - 1
        else:
            signs = 2 * positives.to(logits.dtype) - 1
        terms = -F.logsigmoid(signs * logits)
        return (terms if weights is None else terms * weights).sum() / batch
    kernel = functools.partial(_sigmoid_kernel, negatives=negatives, chunk=chunk_size)
    bias = None if logit_bias is None else torch.as_tensor(logit_bias)
    return apply_kernel(kernel, image_features, text_features, torch.as_tensor(logit_scale), bias)

"""Data-parallel forms of the losses for torch.distributed (gloo on CPUs, NCCL on GPUs).

Each of the W ranks of the default process group holds its local n = B/W rows of the global
batch (rank r: global rows [r·n, (r+1)·n)), the same n on every rank, and the same (replicated)
logit scale t and bias b. Both losses contain collectives: every rank must call them, and run
their backward, the same number of times in the same order.

Gradient convention — the trainer relies on it:

- every rank returns the **global loss** L over all B pairs, the same value on every rank;
- backward on rank r leaves **W · ∂L/∂(its local features)** in its features, and in t and b
  W · ∂ℓ_r/∂t (and ∂b), where ℓ_r is the part of L rank r computes (Σ_r ℓ_r = L);
- so `DistributedDataParallel`, which *averages* parameter gradients over ranks, ends with
  exactly the single-process gradient of L on the concatenated batch, for the towers (through
  the features) and for t and b alike: mean_r W·∂ℓ_r/∂t = Σ_r ∂ℓ_r/∂t = ∂L/∂t.

Formally, L = all-reduce-sum(ℓ_r) and its backward all-reduces the incoming gradients, the exact
adjoint of a sum over ranks: each rank differentiates Σ_ranks L = W·L, and DDP's mean divides
the W back out. Without DDP, divide the gradients by W (or sum them and divide by W) to get ∂L.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx, once_differentiable

from scalestudy.losses import (
    Duplicates,
    LossAndGrads,
    Negatives,
    NegativeWeight,
    TileGrads,
    apply_kernel,
    as_scalar,
    check_features,
    compute_dtype,
    finish_grads,
    records_grad,
    resolve_groups,
    resolve_negatives,
    sigmoid_tiles,
    softmax_kernel,
)

__all__ = ["distributed_softmax_loss", "distributed_sigmoid_loss"]

# torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor (a FutureWarning per call)
# for the same collectives under new names, which older torch (the floor, 2.11) may lack.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _SumOverRanks(torch.autograd.Function):
    """all-reduce-sum whose backward all-reduces the gradients (the adjoint of the sum)."""

    @staticmethod
    def forward(ctx: FunctionCtx, partial: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = partial.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class _GatherRows(torch.autograd.Function):
    """all-gather of every rank's rows (rank order) whose backward sums each rank's slice of the
    incoming gradients over ranks and hands it home (the adjoint of the gather).

    Our own, with public collectives only: torch's `all_gather_single_autograd` is private and not
    in every torch this package supports (absent from 2.11), and `torch.distributed.nn`'s
    all_gather is deprecated. Backward reduce-scatters on NCCL; gloo has no reduce-scatter, so
    there every rank all-reduces the whole gradient and keeps its own rows (as torch.distributed.nn
    falls back to an all-to-all for the same reason)."""

    @staticmethod
    def forward(ctx: FunctionCtx, rows: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rows = rows.contiguous()
        gathered = rows.new_empty((dist.get_world_size() * rows.shape[0], *rows.shape[1:]))
        _all_gather_single(gathered, rows)
        return gathered

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        n = grad.shape[0] // dist.get_world_size()
        if dist.get_backend() == dist.Backend.NCCL:
            mine = grad.new_empty((n, *grad.shape[1:]))
            _reduce_scatter_single(mine, grad)
            return mine
        total = grad.clone()
        dist.all_reduce(total)
        start = dist.get_rank() * n
        return total[start:start + n]


def _shift(send: torch.Tensor, to: int, source: int) -> tuple[torch.Tensor, list[Any]]:
    """Start sending ``send`` to rank ``to`` and receiving a tensor like it from ``source``.

    Non-blocking pairs (batch_isend_irecv), because blocking send/recv round a ring deadlock
    unless the ranks alternate their order. Returns the receive buffer and the works to wait on.
    """
    received = torch.empty_like(send)
    works = dist.batch_isend_irecv(
        [dist.P2POp(dist.isend, send, to), dist.P2POp(dist.irecv, received, source)]
    )
    return received, works


def _sigmoid_ring(
    x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, b: torch.Tensor | None,
    negatives: Negatives, chunk: int, need_grad: bool,
) -> tuple[LossAndGrads, list[torch.Tensor]]:
    """ℓ_r: this rank's image rows against every rank's text rows, passed round the ring.

    Hop k holds the text rows of rank r−k, and sends them on to rank r+1 while the tiles are
    computed (the exchange overlaps the compute, as in big_vision's SigLIP). Positives occur
    at hop 0, the home block, and — duplicate captions as positives — wherever the groups of a
    row and a column agree (`sigmoid_tiles` compares them by global index). Returns ℓ_r with
    ∂ℓ_r/∂(x, t, b) and, per hop, ∂ℓ_r/∂(the text rows held at that hop) — the latter still to be
    sent home by the backward.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    n, norm = x.shape[0], x.shape[0] * world
    dtype = compute_dtype(x)
    xc, block = x.to(dtype), y.to(dtype).contiguous()
    tc, bc = as_scalar(t, dtype), as_scalar(b, dtype)
    raw = TileGrads.zeros(xc, block) if need_grad else None
    total, y_grads = xc.new_zeros(()), []
    for hop in range(world):
        if hop < world - 1:
            incoming, works = _shift(block, (rank + 1) % world, (rank - 1) % world)
        hop_grads = None if raw is None else dataclasses.replace(raw, y=torch.zeros_like(block))
        owner = (rank - hop) % world
        total += sigmoid_tiles(xc, block, tc, bc, rank * n, owner * n, negatives, chunk, hop_grads)
        if hop_grads is not None:
            y_grads.append(hop_grads.y * (tc / norm))
        if hop < world - 1:
            for work in works:
                work.wait()
            block = incoming
    loss = (total / norm).to(x.dtype)
    if raw is None:
        return LossAndGrads(loss), []
    grad_x, _, grad_t, grad_b = finish_grads(raw, xc, tc, (x, y, t, b), norm)
    return LossAndGrads(loss, grad_x, None, grad_t, grad_b), y_grads


class _SigmoidRingFunction(torch.autograd.Function):
    """The ring's ℓ_r; backward sends the text gradients the other way round the ring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
        b: torch.Tensor | None, negatives: Negatives, chunk: int,
    ) -> torch.Tensor:
        result, y_grads = _sigmoid_ring(x, y, t, b, negatives, chunk, need_grad=True)
        ctx.result, ctx.y_grads, ctx.y_dtype = result, y_grads, y.dtype  # type: ignore[attr-defined]
        return result.loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        world, rank = dist.get_world_size(), dist.get_rank()
        # Walk the hops backwards: at hop k this rank held the rows of rank r−k, which rank r−1
        # held at hop k−1; so the running sum goes to r−1 and comes in from r+1, and after the
        # last exchange it is the gradient of this rank's own text rows.
        running = ctx.y_grads[-1]
        for hop in range(world - 1, 0, -1):
            incoming, works = _shift(running, (rank - 1) % world, (rank + 1) % world)
            for work in works:
                work.wait()
            running = incoming + ctx.y_grads[hop - 1]
        result = ctx.result
        scaled = [None if g is None else grad * g for g in (result.x, result.scale, result.bias)]
        return scaled[0], (grad * running).to(ctx.y_dtype), scaled[1], scaled[2], None, None


def _global_batch(image_features: torch.Tensor, text_features: torch.Tensor, chunk_size: int | None) -> int:
    check_features(image_features, text_features, chunk_size)
    return image_features.shape[0] * dist.get_world_size()


def distributed_sigmoid_loss(
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
    """SigLIP's sigmoid loss over the global batch, by the ring (Zhai et al. 2023, §3.3, Fig. 1).

    Rank r scores its n image rows against each rank's text rows in turn: W−1 exchanges pass the
    text rows to the next rank (batch_isend_irecv), positives only in the home block (unless
    duplicate captions are positives), and the backward sends the text gradients back the other
    way. Returns the global loss and follows the module's gradient convention; variants as
    `scalestudy.losses.sigmoid_loss` with the *global* B (``"balanced"`` = 1/(B−1)). With
    masking, the seed drawn from rank 0's generator is broadcast, so the ranks drop exactly the
    pairs the single-process loss drops given that generator. ``groups`` holds the caption ids
    of the *global* batch's B rows, the same tensor on every rank (each rank compares its rows
    with every block that passes by). Tiles of at most ``chunk_size``² logits (default: one n×n
    tile per hop).

    Peak memory per rank: two tiles (three with weighted or masked negatives), two text blocks
    in flight, and W text-gradient blocks (n×D each) kept for the backward.
    """
    batch = _global_batch(image_features, text_features, chunk_size)
    same_caption = resolve_groups(groups, duplicates, batch, image_features.device)
    negatives = resolve_negatives(batch, negative_weight, negative_mask_ratio, generator, same_caption)
    if negatives.mask_ratio > 0:
        seed = torch.tensor(negatives.seed, dtype=torch.int64, device=image_features.device)
        dist.broadcast(seed, src=0)
        negatives = dataclasses.replace(negatives, seed=int(seed))
    chunk = chunk_size or image_features.shape[0]
    scale = torch.as_tensor(logit_scale)
    bias = None if logit_bias is None else torch.as_tensor(logit_bias)
    if records_grad(image_features, text_features, scale, bias):
        partial = _SigmoidRingFunction.apply(image_features, text_features, scale, bias, negatives, chunk)
    else:
        partial = _sigmoid_ring(image_features, text_features, scale, bias, negatives, chunk,
                                need_grad=False)[0].loss
    return _SumOverRanks.apply(partial)


def distributed_softmax_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    chunk_size: int | None = None,
    *,
    groups: torch.Tensor | None = None,
    duplicates: Duplicates = "negative",
) -> torch.Tensor:
    """CLIP's softmax loss over the global batch, by gathering (Radford et al. 2021, §2.5).

    Both feature matrices are all-gathered with gradient (`_GatherRows`, whose backward sums the
    gradients of each rank's rows over ranks); rank r computes the image→text cross-entropies of
    its own image rows and the text→image ones of its own text rows against the whole batch, so
    the ranks split the work of L without overlap. Returns the global loss and follows the module's
    gradient convention. ``groups`` and ``duplicates`` as in `scalestudy.losses.softmax_loss`,
    with the caption ids of the *global* batch's B rows, the same tensor on every rank. Tiles
    of at most ``chunk_size``² logits (default: one n×B tile per direction). Peak memory per
    rank: the gathered B×D features and their gradients, two tiles.
    """
    batch = _global_batch(image_features, text_features, chunk_size)
    same_caption = resolve_groups(groups, duplicates, batch, image_features.device)
    all_images = _GatherRows.apply(image_features)
    all_texts = _GatherRows.apply(text_features)
    scale = torch.as_tensor(logit_scale)
    kernel = functools.partial(
        softmax_kernel, chunk=chunk_size or batch, row_start=dist.get_rank() * image_features.shape[0],
        over_cols=False, norm=2 * batch, groups=same_caption,
    )
    partial = (apply_kernel(kernel, image_features, all_texts, scale, None)
               + apply_kernel(kernel, text_features, all_images, scale, None))
    return _SumOverRanks.apply(partial)

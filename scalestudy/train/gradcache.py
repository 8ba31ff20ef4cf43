"""Batches beyond memory: gradient caching (`train.micro_batch_size`).

Gao, Zhang, Han & Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup" (§3.2–3.3); open_clip's `--accum-freq` does the same. A contrastive loss couples every row
of the batch to every other, so plain gradient accumulation (a loss per micro-batch) would change
the loss. Gradient caching keeps the loss and splits only the towers:

1. the features of every micro-batch, under no_grad (no activations are kept);
2. the loss over the whole batch from those features, as leaves that require grad, and its
   backward to the features (and to t and b): the "gradient cache", B × D numbers per tower;
3. each micro-batch's forward again, with grad, and its backward from its slice of the cached
   feature gradients. By the chain rule the accumulated parameter gradients are the full batch's.

Memory: one micro-batch's activations plus the batch's features. Cost: one extra forward.

With data-parallel ranks each rank micro-batches its own rows: step 2 is the distributed loss
(its collectives run once), step 3 runs under DDP's `no_sync` except for the last micro-batch,
whose backward also carries t's and b's gradients, so DDP reduces every parameter once, in one
backward, exactly as in the single-pass step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from scalestudy.train.precision import Precision

LossOf = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _as_leaf(value: torch.Tensor | None) -> torch.Tensor | None:
    """A detached copy that collects the loss's gradient when `value` needs one."""
    if value is None:
        return None
    return value.detach().requires_grad_(value.requires_grad)


def cached_gradient_step(
    forward: nn.Module, images: torch.Tensor, tokens: torch.Tensor, micro_batch: int,
    loss_of: LossOf, scale: torch.Tensor, bias: torch.Tensor | None, precision: Precision,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accumulate the full batch's gradients into the parameters, `micro_batch` rows at a time.

    `forward(images, tokens)` gives float32 (image, text) features; `loss_of(image_features,
    text_features, scale, bias)` is the loss over the whole batch; `scale` is t as computed from
    its parameter this step and `bias` is b (a parameter) or None. Returns the batch's features
    (detached) and the loss (detached).
    """
    chunks = list(zip(images.split(micro_batch), tokens.split(micro_batch)))
    with torch.no_grad(), precision.autocast():
        parts = [forward(image_rows, token_rows) for image_rows, token_rows in chunks]
    image_features = torch.cat([image for image, _ in parts]).requires_grad_()
    text_features = torch.cat([text for _, text in parts]).requires_grad_()
    scale_leaf, bias_leaf = _as_leaf(scale), _as_leaf(bias)
    assert scale_leaf is not None
    loss = loss_of(image_features, text_features, scale_leaf, bias_leaf)
    # float32 from features to loss: nothing here underflows, so no loss scaling yet.
    loss.backward()
    image_grads = image_features.grad.split(micro_batch)  # type: ignore[union-attr]
    text_grads = text_features.grad.split(micro_batch)  # type: ignore[union-attr]

    no_sync = getattr(forward, "no_sync", None)  # DDP's; a compiled DDP forwards it too
    last = len(chunks) - 1
    for k, (image_rows, token_rows) in enumerate(chunks):
        context = no_sync() if no_sync is not None and k < last else contextlib.nullcontext()
        with context:
            with precision.autocast():
                image, text = forward(image_rows, token_rows)
            outputs, grads = [image, text], [image_grads[k], text_grads[k]]
            if k == last:  # t and b join the last backward (see the module docstring)
                outputs += [scale, bias] if bias is not None else [scale]
                grads += [scale_leaf.grad, bias_leaf.grad] if bias_leaf is not None else [scale_leaf.grad]
            kept = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad and g is not None]
            if kept:  # a locked tower's features need no backward
                precision.backward_from([o for o, _ in kept], [g for _, g in kept])
    return image_features.detach(), text_features.detach(), loss.detach()

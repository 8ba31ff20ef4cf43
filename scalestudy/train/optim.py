"""AdamW with decoupled weight decay on matrices only, and the LR schedule as a pure function."""

from __future__ import annotations

import math

import torch
from torch import nn

from scalestudy.expand import Derived
from scalestudy.spec import OptimSpec


def make_optimizer(model: nn.Module, spec: OptimSpec, lr: float) -> torch.optim.AdamW:
    """Weight decay on weight matrices and embeddings; none on gains, biases, t and b (as CLIP)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": spec.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel per step on CPU and CUDA, and it honours `optimizer.found_inf` (skip the
    # whole update on the device), which the loop uses to stop at a non-finite step without a sync.
    return torch.optim.AdamW(groups, lr=lr, betas=(spec.beta1, spec.beta2), eps=spec.eps, fused=True)


def lr_at(step: int, derived: Derived, schedule: str) -> float:
    """LR for 1-based `step`: linear warm-up to derived.lr, then cosine to zero or constant."""
    if step <= derived.warmup_steps:
        return derived.lr * step / derived.warmup_steps
    if schedule == "constant":
        return derived.lr
    decay_steps = max(1, derived.steps - derived.warmup_steps)
    # The first step after warm-up trains at the full LR; the last one just above zero.
    progress = (step - derived.warmup_steps - 1) / decay_steps
    return 0.5 * derived.lr * (1 + math.cos(math.pi * progress))

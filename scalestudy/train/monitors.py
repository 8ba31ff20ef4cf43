"""Online monitors: small stateful classes fed one step at a time, tested on synthetic series."""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import torch


class SpikeDetector:
    """Flags a value above `threshold` × the running median of the previous `window` values.

    SigLIP §4.4 traces large-batch degradation to gradient-norm spikes; a ratio to a running median
    is scale-free (it means the same at every batch size and LR) and robust to the spikes themselves.
    Nothing is flagged until `window // 2` values have been seen, so the noisy first steps of
    training are not counted. Non-finite values are never spikes (divergence handles them) and never
    enter the history.
    """

    def __init__(self, threshold: float, window: int) -> None:
        self.threshold = threshold
        self.window = window
        self.history: deque[float] = deque(maxlen=window)

    def update(self, value: float) -> tuple[bool, float | None]:
        """Feed one value; returns (is_spike, ratio to the running median or None while warming up)."""
        if not math.isfinite(value):
            return False, None
        ratio = None
        if len(self.history) >= max(1, self.window // 2):
            median = statistics.median(self.history)
            ratio = value / median if median > 0 else None
        self.history.append(value)
        return (ratio is not None and ratio > self.threshold), ratio

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.window)


def norm(tensors: list[torch.Tensor]) -> float:
    """The global L2 norm of a list of tensors (0 for an empty list)."""
    if not tensors:
        return 0.0
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])).item()


@torch.no_grad()
def logit_means(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[float, float]:
    """Mean positive (diagonal) and negative (off-diagonal) logit t·xᵢ·yⱼ + b, without the B×B matrix.

    The sum of all logits factorises: Σᵢⱼ xᵢ·yⱼ = (Σᵢ xᵢ)·(Σⱼ yⱼ), so this costs O(B·D).
    """
    batch = image_features.shape[0]
    b = 0.0 if bias is None else bias.item()
    t = scale.item()
    diagonal = (image_features * text_features).sum().item()
    total = (image_features.sum(0) @ text_features.sum(0)).item()
    positive = t * diagonal / batch + b
    negative = t * (total - diagonal) / max(1, batch * batch - batch) + b
    return positive, negative


@torch.no_grad()
def adam_staleness(optimizer: torch.optim.Optimizer) -> float | None:
    """max over parameter tensors of RMS(g² / v̂), with v̂ Adam's bias-corrected second moment
    *before* this step's update.

    Wortsman et al. 2023 ("Stable and low-precision training for large-scale vision-language
    models", §3.4) find loss spikes follow this going far above 1 a few steps earlier: the
    second-moment estimate is stale (too small) for the gradient it is about to scale. None on the
    first step, when there is no estimate yet.
    """
    worst: float | None = None
    for group in optimizer.param_groups:
        beta2 = group["betas"][1]
        for param in group["params"]:
            state = optimizer.state.get(param)
            if param.grad is None or not state or "exp_avg_sq" not in state:
                continue
            step = float(state["step"])
            v_hat = state["exp_avg_sq"] / (1 - beta2**step)
            rms = (param.grad.square() / (v_hat + group["eps"] ** 2)).mean().sqrt().item()
            worst = rms if worst is None else max(worst, rms)
    return worst


class UpdateNorm:
    """Norm of the change an optimiser step makes to the parameters (snapshot before, diff after)."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.before: list[torch.Tensor] = []

    @torch.no_grad()
    def snapshot(self) -> None:
        self.before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def measure(self) -> float:
        return norm([p.detach() - b for p, b in zip(self.params, self.before)])

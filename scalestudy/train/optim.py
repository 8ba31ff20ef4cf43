"""The optimisers (AdamW, StableAdamW), their weight-decay groups, the update RMS they share, and
the LR schedule as a pure function.

Both optimisers honour `optimizer.found_inf`, a 0-d float tensor on the parameters' device: 1.0
skips the step entirely (parameters, moments and step counts untouched), 0.0 takes it. The loop
sets it from a device-side finiteness flag, so a non-finite step is gated without the host ever
reading a value (see `NonFiniteGate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from scalestudy.expand import Derived
from scalestudy.spec import OptimSpec


def weight_decay_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that decay and that do not.

    Weight matrices, convolution kernels and embeddings (ndim ≥ 2) decay; gains, biases, the
    logit scale t and bias b (ndim ≤ 1) do not, as in CLIP.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(name)
    return decay, no_decay


# The loss's logit scale (as log t) and bias: optim.scalar_lr gives them their own LR.
SCALARS = ("log_scale", "bias")


def make_optimizer(model: nn.Module, spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    """optim.kind's optimiser over the two weight-decay groups (decay group first), and with
    optim.scalar_lr a third for t and b whose `lr_scale` (scalar_lr / lr) multiplies the
    scheduled LR."""
    decay, no_decay = weight_decay_groups(model)
    scalars = [n for n in no_decay if n in SCALARS] if spec.scalar_lr is not None else []
    params = dict(model.named_parameters())
    groups: list[dict[str, Any]] = [
        {"params": [params[n] for n in decay], "weight_decay": spec.weight_decay},
        {"params": [params[n] for n in no_decay if n not in scalars], "weight_decay": 0.0},
    ]
    if scalars:
        assert spec.scalar_lr is not None
        groups.append({"params": [params[n] for n in scalars], "weight_decay": 0.0,
                       "lr": spec.scalar_lr, "lr_scale": spec.scalar_lr / lr})
    betas = (spec.beta1, spec.beta2)
    if spec.kind == "stable_adamw":
        return StableAdamW(groups, lr=lr, betas=betas, eps=spec.eps)
    return FusedAdamW(groups, lr=lr, betas=betas, eps=spec.eps)


class FusedAdamW(torch.optim.AdamW):
    """torch's AdamW with `fused=True` (one kernel for all tensors, and the only torch AdamW path
    that honours `found_inf`), stepped straight through that kernel, `torch._fused_adamw_`.

    The same kernel on the same tensors, so every update is bit for bit torch's (tested), and the
    state is torch's too (a checkpoint loads into either). What it leaves out is per-step Python
    that gives the same answer every step for a model whose tensors share one device and dtype:
    rebuilding the state lists per group and grouping them by device and dtype. At the tiny
    model's ~5 ms step that came to ~0.1 ms. Any other model steps through torch's own code.
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float],
                 eps: float) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, fused=True)
        # Per group: the parameters with a gradient and their state, or None for a model that
        # steps through torch's code; rebuilt when which parameters have a gradient changes.
        self._lists: list[tuple[list[torch.Tensor], ...]] | None = None
        self._with_grad: list[list[bool]] | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        with_grad = [[p.grad is not None for p in group["params"]] for group in self.param_groups]
        if with_grad != self._with_grad:
            tensors = [p for group in self.param_groups for p in group["params"]]
            plain = len({(p.device, p.dtype) for p in tensors}) == 1 and not any(
                group["amsgrad"] or group["maximize"] for group in self.param_groups)
            self._lists = [self._state_lists(g) for g in self.param_groups] if plain else None
            self._with_grad = with_grad
        if closure is not None or self._lists is None:
            return super().step(closure)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        steps = [step for _, _, _, group_steps in self._lists for step in group_steps]
        torch._foreach_add_(steps, 1)
        for group, (params, exp_avgs, exp_avg_sqs, group_steps) in zip(self.param_groups, self._lists):
            if params:
                beta1, beta2 = group["betas"]
                torch._fused_adamw_(
                    params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], group_steps,
                    amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                    grad_scale=grad_scale, found_inf=found_inf)
        if found_inf is not None:  # a skipped step does not count (as in torch's own)
            torch._foreach_sub_(steps, [found_inf] * len(steps))
        return None

    def _state_lists(self, group: dict[str, Any]) -> tuple[list[torch.Tensor], ...]:
        """The group's parameters with a gradient and their step, exp_avg, exp_avg_sq (created as
        torch's AdamW creates them, on the first step)."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                                     exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                                     exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
        return (params, [self.state[p]["exp_avg"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params], [self.state[p]["step"] for p in params])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._with_grad = None  # rebuild the lists: the state tensors are new objects

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._with_grad = None


def bias_corrections(steps: Sequence[torch.Tensor], beta: float) -> list[torch.Tensor]:
    """Adam's 1 − β^t for each step count t (device tensors), as −expm1(t·ln β).

    The same value as 1 − β^t but accurate in float32 (the step tensors' dtype): 1 − 0.999^1 by
    subtraction loses three digits to cancellation, 1e-5 relative; expm1 keeps them.
    """
    # β = 0 (allowed for β1) gives ln β = −∞ and the right correction, 1, for every t ≥ 1.
    corrections = torch._foreach_mul(steps, math.log(beta) if beta > 0 else -math.inf)
    torch._foreach_expm1_(corrections)
    torch._foreach_neg_(corrections)
    return corrections


@torch.no_grad()
def update_rms(
    grads: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor], beta2: float, eps: float,
) -> list[torch.Tensor]:
    """RMS_t = sqrt(mean(g_t² / max(u_t, ε²))) per tensor, as 0-d tensors (no host sync).

    Wortsman et al. 2023 (§3.4, Algorithm 2): u_t is Adam's bias-corrected second moment
    *including* the current gradient, u_t = (β2·v_{t−1} + (1−β2)·g_t²) / (1 − β2^t), with
    v_{t−1} = `exp_avg_sqs` and t − 1 = `steps` (torch AdamW's state layout). RMS_t ≫ 1 means
    the estimate is stale: too small for the gradient it is about to scale. On step 1, u_1 = g_1²
    and RMS_1 = 1 wherever |g| > ε. The ε² floor on u_t is theirs.
    """
    squares = torch._foreach_mul(grads, grads)
    u = torch._foreach_mul(exp_avg_sqs, beta2)
    torch._foreach_add_(u, squares, alpha=1 - beta2)
    torch._foreach_div_(u, bias_corrections(torch._foreach_add(steps, 1), beta2))
    torch._foreach_maximum_(u, eps**2)
    torch._foreach_div_(squares, u)
    # mean = L1 norm / numel for the non-negative ratios: one vectorised reduction.
    means = torch._foreach_norm(squares, 1)
    torch._foreach_div_(means, [float(g.numel()) for g in grads])
    return torch._foreach_sqrt(means)


class StableAdamW(torch.optim.Optimizer):
    """AdamW with update clipping: Wortsman et al. 2023, §3.5 and Algorithm 2.

    Per tensor, η_t = lr / max(1, RMS_t) (see `update_rms`), and
    θ_t = θ_{t−1} − η_t·λ·θ_{t−1} − η_t·m̂_t / (sqrt(v̂_t) + ε), with Adam's bias-corrected moments
    m̂_t, v̂_t and decoupled weight decay λ scaled by the clipped η_t as in their Algorithm 2. With
    every RMS_t ≤ 1 this is exactly AdamW. Adafactor's update clipping (Shazeer & Stern 2018)
    moved into AdamW: a step whose second-moment estimate is stale is shortened instead of
    producing the loss spike that follows it (§3.4).

    Vectorised with foreach ops; state has torch AdamW's layout (step, exp_avg, exp_avg_sq), with
    step a device tensor. `found_inf` (see the module docstring) is honoured without a host sync.
    After each step `last_rms` holds RMS_t per parameter, in param_groups order (NaN for a
    parameter without a gradient), so the update-RMS monitor does not compute it twice.
    """

    def __init__(
        self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.found_inf: torch.Tensor | None = None
        self.last_rms: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        per_param: list[torch.Tensor] = []
        for group in self.param_groups:
            per_param.extend(self._step_group(group))
        self.last_rms = torch.stack(per_param) if per_param else None
        return loss

    def _step_group(self, group: dict[str, Any]) -> list[torch.Tensor]:
        with_grad = [p for p in group["params"] if p.grad is not None]
        if not with_grad:
            return [torch.full((), math.nan, device=p.device) for p in group["params"]]
        for p in with_grad:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["step"].device != p.device:  # a checkpoint loaded with its step on the CPU
                state["step"] = state["step"].to(p.device, torch.float32)
        grads = [p.grad for p in with_grad]
        exp_avgs = [self.state[p]["exp_avg"] for p in with_grad]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in with_grad]
        steps = [self.state[p]["step"] for p in with_grad]
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]

        # RMS_t from the raw gradients and the previous state, before anything changes.
        rms = torch.stack(update_rms(grads, exp_avg_sqs, steps, beta2, eps))
        clip = rms
        # keep = 1 − found_inf: a skipped step multiplies every change by 0. Gradients are zeroed
        # first (where, not ×0: 0·NaN is NaN), so the moments and parameters stay bit-identical.
        keep: float | torch.Tensor = 1.0
        if self.found_inf is not None:
            skip = self.found_inf.to(with_grad[0].device) > 0
            keep = 1 - self.found_inf.to(with_grad[0].device, torch.float32)
            grads = [torch.where(skip, 0.0, g) for g in grads]
            clip = torch.where(skip, 1.0, rms)
        torch._foreach_add_(steps, [keep] * len(steps) if isinstance(keep, torch.Tensor) else keep)
        # m ← β1'·m + (1 − β1')·g with β1' = 1 − (1 − β1)·keep: β1 when stepping, 1 when
        # skipped; likewise v with g². Out-of-place products: the gradients stay untouched.
        rate1, rate2 = (1 - beta1) * keep, (1 - beta2) * keep
        torch._foreach_mul_(exp_avgs, 1 - rate1)
        torch._foreach_add_(exp_avgs, torch._foreach_mul(grads, rate1))
        squares = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(squares, rate2)
        torch._foreach_mul_(exp_avg_sqs, 1 - rate2)
        torch._foreach_add_(exp_avg_sqs, squares)

        # Bias corrections from the step count on the device (≥ 1, so a skipped first step
        # divides by 1 − β, not 0).
        counts = torch._foreach_clamp_min(steps, 1.0)
        correction1, correction2 = bias_corrections(counts, beta1), bias_corrections(counts, beta2)
        denominators = torch._foreach_div(exp_avg_sqs, correction2)
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, eps)

        eta = keep * lr / clip.clamp(min=1.0)  # η_t per tensor, 0 on a skipped step
        if decay:
            torch._foreach_mul_(with_grad, list((1 - eta * decay).unbind()))
        step_sizes = list((eta / torch.stack(correction1)).unbind())
        updates = torch._foreach_div(exp_avgs, denominators)
        torch._foreach_mul_(updates, step_sizes)
        torch._foreach_sub_(with_grad, updates)

        values = iter(rms.unbind())
        return [next(values) if p.grad is not None else torch.full((), math.nan, device=p.device)
                for p in group["params"]]


class NonFiniteGate:
    """A device-side, sticky "skip the optimizer step" flag, for `optimizer.found_inf`.

    The host reads step values only at a flush, so it learns of a non-finite loss or gradient
    norm some steps late. From the first non-finite step on, every step is skipped: when the host
    finds the bad step, the model is exactly as it was before it (the trial then stops there and
    drops the rows after it).
    """

    def __init__(self, device: torch.device) -> None:
        self.halted = torch.zeros((), dtype=torch.bool, device=device)

    def update(self, *values: torch.Tensor) -> torch.Tensor:
        """Fold this step's values in; returns found_inf (0-d float32: 1.0 = skip the step)."""
        for value in values:
            self.halted |= ~torch.isfinite(value)
        return self.halted.to(torch.float32)


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

"""Online monitors, computed on the parameters' device without a single host sync.

Every per-step figure is a 0-d tensor on the device: nothing here calls `.item()`, `.tolist()`,
`float()`, `bool()` or `.cpu()` on a value, or branches in Python on one (the tests run the
whole per-step path on the meta device, where any of those raises). The loop collects each
step's tensors in `scalestudy.train.recorder.DeviceRows`, which stacks them and copies them to the host once per flush; on
a GPU the host then runs ahead of the device instead of waiting for it ~70 times a step.
Each monitor is tested on synthetic series against a plain formula.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from scalestudy.train.optim import StableAdamW, bias_corrections

# The image tower's patch embedding (the ViT's first layer), where Wortsman et al. 2023 (§3.4)
# watch the update RMS rise a few steps before a loss spike.
PATCH_EMBED = "image.patchify.weight"


@torch.no_grad()
def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all `tensors` together, as a 0-d tensor: one vectorised foreach reduction."""
    if not tensors:
        raise ValueError("global_norm of no tensors: pass at least one")
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


class GradNorms:
    """The global and per-tower gradient norms, before any clipping.

    One `_foreach_norm` over every gradient gives the per-tensor norms; the global and tower
    norms are sums of their squares over precomputed index sets (a locked tower's norm is 0).
    After backward under DistributedDataParallel the gradients are already averaged over ranks,
    so every rank computes the same figures.
    """

    def __init__(self, model: nn.Module, towers: Sequence[str] = ("image", "text")) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("GradNorms: the model has no trainable parameters")
        self.params = [p for _, p in named]
        device = self.params[0].device
        self._zero = torch.zeros((), device=device)
        self._towers = {
            tower: torch.tensor([i for i, (n, _) in enumerate(named) if n.startswith(f"{tower}.")],
                                dtype=torch.long, device=device)
            for tower in towers
        }

    @torch.no_grad()
    def __call__(self) -> dict[str, torch.Tensor]:
        """{"grad_norm", "grad_norm_<tower>"...} as 0-d tensors (a missing gradient counts as 0)."""
        grads = [self._zero if p.grad is None else p.grad for p in self.params]
        squares = torch.stack(torch._foreach_norm(grads)).square()
        norms = {"grad_norm": squares.sum().sqrt()}
        for tower, index in self._towers.items():
            norms[f"grad_norm_{tower}"] = squares.index_select(0, index).sum().sqrt()
        return norms


class UpdateNorm:
    """The norm of the change one optimizer step makes, and the parameter norm after it.

    `snapshot()` before the step copies the parameters into buffers allocated once; `measure()`
    after it differences them, both with foreach ops.
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.before = [torch.empty_like(p) for p in self.params]

    @torch.no_grad()
    def snapshot(self) -> None:
        torch._foreach_copy_(self.before, self.params)

    @torch.no_grad()
    def measure(self) -> dict[str, torch.Tensor]:
        """{"update_norm", "param_norm"} as 0-d tensors: the change in place of the snapshot (its
        sign does not change its norm), and both lists' norms in one foreach call."""
        torch._foreach_sub_(self.before, self.params)
        norms = torch.stack(torch._foreach_norm(self.before + self.params))
        count = len(self.params)
        return {"update_norm": torch.linalg.vector_norm(norms[:count]),
                "param_norm": torch.linalg.vector_norm(norms[count:])}


@torch.no_grad()
def logit_means(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean positive (diagonal) and negative (off-diagonal) logit t·xᵢ·yⱼ + b, as 0-d tensors,
    without the B×B matrix.

    The sum of all logits factorises: Σᵢⱼ xᵢ·yⱼ = (Σᵢ xᵢ)·(Σⱼ yⱼ), so this costs O(B·D).
    """
    batch = image_features.shape[0]
    diagonal = (image_features * text_features).sum()
    total = image_features.sum(0) @ text_features.sum(0)
    positive = scale * diagonal / batch
    negative = scale * (total - diagonal) / max(1, batch * batch - batch)
    if bias is not None:
        positive, negative = positive + bias, negative + bias
    return positive, negative


# 1.4826 × the median absolute deviation estimates the standard deviation of a normal series.
ROBUST_SD = 1.4826


def _sorted_median(ordered: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row of `ordered` (sorted, its first `counts` entries the values, the rest NaN): the
    median as statistics.median defines it (the mean of the two middle values for an even count)."""
    width = ordered.shape[1]
    low = ordered.gather(1, ((counts - 1) // 2).clamp(min=0, max=width - 1).unsqueeze(1)).squeeze(1)
    high = ordered.gather(1, (counts // 2).clamp(max=width - 1).unsqueeze(1)).squeeze(1)
    return (low + high) / 2


class SpikeDetector:
    """Flags a value above `threshold` × the running median of the previous `window` values.

    SigLIP §4.4 traces large-batch degradation to gradient-norm spikes, and Wortsman et al. 2023
    (§3.4) study loss spikes; a ratio to a running median is scale-free (it means the same at
    every batch size and LR) and robust to the spikes themselves. The median is
    `statistics.median`'s (the mean of the two middle values for an even count).

    On the device: the history is a ring buffer tensor and the ratio and flag are 0-d tensors.
    How many values have been fed is a Python int, so the warm-up needs no sync: while fewer than
    `window // 2` have been seen the ratio is NaN (the noisy first steps are not judged). A
    non-finite value never raises, has ratio NaN and is no spike (divergence handles it); the
    trial stops at it, so what it leaves in the history does not matter — except with
    `skip_non_finite` (fp16 trials, whose overflow steps the loss scaler skips and the trial goes
    on): then a non-finite value is kept out of the median, which is over the finite values among
    the previous `window`, and the warm-up counts finite values too.

    With `mads` set, a spike is instead a value more than `mads` robust standard deviations above
    the running median: value − median > mads × 1.4826 × MAD, with MAD the median absolute
    deviation of the same window (1.4826 × MAD estimates a normal series' standard deviation).
    That rule follows the series' own noise, so it means the same for a loss near its no-learning
    level and for a loss driven towards 0, where a ratio to the median flags sampling noise (a
    trained softmax's batch loss reaches 2.3–2.5× its median at B = 128 from sampling alone). The
    ratio is still returned.
    """

    def __init__(self, threshold: float, window: int, device: torch.device | str = "cpu",
                 skip_non_finite: bool = False, mads: float | None = None) -> None:
        if window < 1:
            raise ValueError(f"SpikeDetector window={window}: use at least 1 value")
        self.mads = mads
        self.threshold = threshold
        self.window = window
        self.warmup = max(1, window // 2)
        self.skip_non_finite = skip_non_finite
        self.history = torch.full((window,), math.nan, dtype=torch.float64, device=device)
        self.count = 0
        self._nan = torch.full((), math.nan, dtype=torch.float64, device=device)

    def _stored(self, values: torch.Tensor) -> torch.Tensor:
        """What enters the history: with skip_non_finite a non-finite value as NaN, which sorts
        after every finite value and is not counted."""
        return torch.where(torch.isfinite(values), values, self._nan) if self.skip_non_finite else values

    @torch.no_grad()
    def update(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one 0-d value; returns (is_spike: bool, ratio to the running median: float64,
        NaN while warming up or when the median is not positive)."""
        value = value.detach().to(torch.float64)
        seen = min(self.count, self.window)
        if self.count >= self.warmup:
            ordered = torch.sort(self.history[:seen]).values
            usable = torch.isfinite(value)
            if self.skip_non_finite:  # the middle of the finite values, sorted first
                finite = torch.isfinite(ordered).sum()
                middle = torch.stack([(finite - 1).div(2, rounding_mode="floor"),
                                      finite.div(2, rounding_mode="floor")]).clamp(0, seen - 1)
                median = ordered.index_select(0, middle).sum() / 2
                usable = usable & (finite >= self.warmup)
            else:
                median = (ordered[(seen - 1) // 2] + ordered[seen // 2]) / 2
            spike = None
            if self.mads is not None:
                deviations = (self.history[:seen] - median).abs().unsqueeze(0)
                counts = torch.isfinite(deviations).sum(1)
                spread = ROBUST_SD * _sorted_median(deviations.sort(dim=1).values, counts)[0]
                spike = usable & (spread > 0) & (value - median > self.mads * spread)
            usable = usable & (median > 0)
            ratio = torch.where(usable, value / median, self._nan)
        else:
            ratio, spike = self._nan.clone(), None
        self.history[self.count % self.window] = self._stored(value)
        self.count += 1
        if self.mads is None:
            return ratio > self.threshold, ratio
        return (spike if spike is not None else torch.zeros((), dtype=torch.bool,
                                                             device=self.history.device)), ratio

    @torch.no_grad()
    def update_many(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed a whole series at once: the flags and ratios `update` would give value by value.

        For histories made offline (synthetic runs, benchmarks), where 10⁴ steps one call each
        would take seconds: every value's window of predecessors is one row of an unfolded view,
        sorted together.
        """
        values = values.detach().to(self.history.device, torch.float64).flatten()
        n, window = values.numel(), self.window
        if n == 0:
            return values > self.threshold, values
        seen = min(self.count, window)
        past = (self.history.roll(-(self.count % window)) if self.count >= window
                else self.history[:seen])
        # window NaNs in front, so the predecessors of value j are row seen + j of the unfold.
        series = torch.cat([self.history.new_full((window,), math.nan), past, self._stored(values)])
        windows = series.unfold(0, window, 1)[seen:seen + n]
        counts = (torch.arange(n, device=values.device) + self.count).clamp(max=window)
        ordered = windows.sort(dim=1).values  # the NaN padding sorts last, after the counts values
        usable = counts >= self.warmup
        if self.skip_non_finite:  # NaN padding and skipped values alike sort last, uncounted
            counts = torch.isfinite(ordered).sum(1)
            usable = usable & (counts >= self.warmup)
        median = _sorted_median(ordered, counts)
        usable = usable & torch.isfinite(values)
        if self.mads is not None:
            deviations = (windows - median.unsqueeze(1)).abs()  # NaN padding stays NaN, sorts last
            spread = ROBUST_SD * _sorted_median(deviations.sort(dim=1).values,
                                                torch.isfinite(deviations).sum(1))
            spike = usable & (spread > 0) & (values - median > self.mads * spread)
        usable = usable & (median > 0)
        ratio = torch.where(usable, values / median, self._nan)
        kept = min(self.count + n, window)
        slots = torch.arange(self.count + n - kept, self.count + n, device=values.device) % window
        self.history.index_copy_(0, slots, series[-kept:])
        self.count += n
        return (ratio > self.threshold if self.mads is None else spike), ratio

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints: torch.load(weights_only=True) reads it back."""
        return {"history": self.history.clone(), "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        history = state["history"]
        if isinstance(history, list):
            # A checkpoint of an earlier version: the last ≤ window values, oldest first. In ring
            # slots 0…n−1 with count n, the next value overwrites the oldest, as it should.
            self.history.fill_(math.nan)
            self.history[:len(history)] = torch.tensor(history, dtype=torch.float64)
            self.count = len(history)
            return
        if tuple(history.shape) != (self.window,):
            raise ValueError(
                f"spike detector state holds {tuple(history.shape)} values but this detector's "
                f"window is {self.window}: resume with the monitor window the trial started with"
            )
        self.history.copy_(history)
        self.count = int(state["count"])


class UpdateRMS:
    """The per-tensor update RMS of Wortsman et al. 2023 (§3.4), summarised for the step row.

    RMS_t = sqrt(mean(g_t² / u_t)) per parameter tensor (see `optim.update_rms`); loss spikes
    follow it rising far above 1 in a few layers, the patch embedding first. With StableAdamW the
    optimizer computes it anyway (`last_rms`); with torch's AdamW this monitor computes it from
    the optimizer's state in a step pre-hook, so in both cases it is the RMS of the step about to
    be taken, from the (clipped) gradients that step uses. Call `read()` after
    `optimizer.step()`.

    The hook computes only what the row reports, the weight matrices (ndim ≥ 2), t and b, unless
    `every_tensor`: the per-tensor figures are independent, so leaving out the gains and biases
    (21 of the tiny model's 38 tensors) changes no reported value and saves a kernel call per
    left-out tensor in each of its five passes.

    `names` lists the optimizer's parameters in param_groups order; `rms_max_index` indexes it.
    Parameters are found by name in `model.named_parameters()`: the patch embedding is
    `patch_embed`, the logit scale `log_scale` and the sigmoid bias `bias`; a figure whose
    parameter is absent or frozen (softmax has no bias; t may be fixed) is left out of the row.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 patch_embed: str = PATCH_EMBED, every_tensor: bool = False) -> None:
        by_id = {id(p): name for name, p in model.named_parameters()}
        if patch_embed not in by_id.values():
            raise ValueError(
                f"UpdateRMS: the model has no parameter named {patch_embed!r} for the patch "
                f"embedding; pass patch_embed= one of {sorted(by_id.values())}"
            )
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.names = [by_id[id(p)] for p in params]
        self.optimizer = optimizer
        device = params[0].device
        position = {name: i for i, name in enumerate(self.names)}
        matrices = [i for i, p in enumerate(params) if p.ndim >= 2]
        singles = {column: position[name] for column, name in (
            ("rms_patch_embed", patch_embed), ("rms_temperature", "log_scale"), ("rms_bias", "bias"),
        ) if name in position}
        # The tensors whose RMS the hook computes (`names` indices, in order), and where the row's
        # figures sit among them.
        computed = (list(range(len(params))) if every_tensor
                    else sorted({*matrices, *singles.values()}))
        at = {index: i for i, index in enumerate(computed)}
        self._computed = torch.tensor(computed, dtype=torch.long, device=device)
        self._hooked = [params[i] for i in computed]
        self._hooked_ids = {id(p) for p in self._hooked}
        self._matrices = torch.tensor(matrices, dtype=torch.long, device=device)
        self._matrices_at = torch.tensor([at[i] for i in matrices], dtype=torch.long, device=device)
        self._single = {column: at[i] for column, i in singles.items()}
        self._nan = torch.full((), math.nan, device=device)
        self._numel_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._per_tensor: torch.Tensor | None = None  # RMS_t of `_hooked`, in that order
        if not isinstance(optimizer, StableAdamW):
            optimizer.register_step_pre_hook(self._before_step)

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        buckets: dict[tuple[float, float], list[nn.Parameter]] = {}
        for group in optimizer.param_groups:  # the groups differ in weight decay only, as a rule
            key = (group["betas"][1], group["eps"])
            buckets.setdefault(key, []).extend(
                p for p in group["params"] if p.grad is not None and id(p) in self._hooked_ids)
        rms = {key: self._rms(optimizer, params, *key) for key, params in buckets.items() if params}
        if len(rms) == 1 and len(next(iter(buckets.values()))) == len(self._hooked):
            self._per_tensor = next(iter(rms.values()))  # every hooked tensor, in order
            return
        by_param = {id(p): value for key, params in buckets.items() if params
                    for p, value in zip(params, rms[key].unbind())}
        self._per_tensor = torch.stack([by_param.get(id(p), self._nan) for p in self._hooked])

    def _rms(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], beta2: float,
             eps: float) -> torch.Tensor:
        """`optim.update_rms` for torch AdamW's state in five passes over the parameters (it takes
        eight), with no pass for g² alone: with w = v_{t−1} + (1−β2)/β2·g_t² (one addcmul; β2·w is
        Adam's new second moment) and c = 1 − β2^t, u_t = β2·w/c, so
        RMS_t² = mean(g²/max(u_t, ε²)) = (c/β2)·mean((g/√max(w, c·ε²/β2))²):
        a floor, a square root, a division and a 2-norm (β2 > 0, as optim.beta2 requires). The
        per-tensor factors act on one vector of per-tensor norms."""
        grads = [p.grad for p in params]
        states = [optimizer.state.get(p) for p in params]
        # Before the first step there is no state: v_0 = 0 and t − 1 = 0.
        exp_avg_sqs = [s["exp_avg_sq"] if s else torch.zeros_like(p) for s, p in zip(states, params)]
        steps = torch.stack([s["step"] if s else p.new_zeros(()) for s, p in zip(states, params)])
        correction = bias_corrections([steps + 1], beta2)[0]
        w = torch._foreach_addcmul(exp_avg_sqs, grads, grads, (1 - beta2) / beta2)  # type: ignore[arg-type]
        torch._foreach_maximum_(w, list((correction * (eps**2 / beta2)).unbind()))
        torch._foreach_sqrt_(w)
        scaled = torch._foreach_div(grads, w)  # type: ignore[arg-type]
        norms = torch.stack(torch._foreach_norm(scaled))
        return norms * (correction / (beta2 * self._numels(params))).sqrt()

    def _numels(self, params: list[nn.Parameter]) -> torch.Tensor:
        """Element counts of `params` as a device vector, made once per parameter set (a fresh
        host→device copy every step would wait for the device on CUDA)."""
        key = tuple(id(p) for p in params)
        if key not in self._numel_cache:
            self._numel_cache[key] = torch.tensor([float(p.numel()) for p in params],
                                                  device=params[0].device)
        return self._numel_cache[key]

    def _computed_rms(self) -> torch.Tensor:
        """RMS_t of the tensors the hook computes, in `_computed` order."""
        if isinstance(self.optimizer, StableAdamW):  # it computes every tensor's RMS
            rms = self.optimizer.last_rms
            rms = None if rms is None else rms.index_select(0, self._computed)
        else:
            rms = self._per_tensor
        if rms is None:
            raise RuntimeError("UpdateRMS.read() before any optimizer.step(): call it after the step")
        return rms

    def per_tensor(self) -> torch.Tensor:
        """RMS_t of every parameter tensor of the last step, in `names` order: NaN for the ones
        the hook leaves out (see the class docstring; StableAdamW computes all of them)."""
        if isinstance(self.optimizer, StableAdamW) and self.optimizer.last_rms is not None:
            return self.optimizer.last_rms
        rms = self._computed_rms()
        return torch.full((len(self.names),), math.nan, device=rms.device).index_copy_(
            0, self._computed, rms)

    def read(self) -> dict[str, torch.Tensor]:
        """rms_max (over weight matrices, ndim ≥ 2), rms_max_index (into `names`),
        rms_patch_embed, rms_temperature, rms_bias: 0-d tensors."""
        rms = self._computed_rms()
        matrices = rms.index_select(0, self._matrices_at)
        # index_select, not [argmax]: indexing with a 0-d tensor would read it on the host.
        row = {"rms_max": matrices.max(),
               "rms_max_index": self._matrices.index_select(0, matrices.argmax().view(1))[0]}
        row.update({column: rms[i] for column, i in self._single.items()})
        return row

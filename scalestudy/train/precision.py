"""The arithmetic a trial trains in (`train.precision`): fp32, tf32, bf16 or fp16.

Parameters, gradients, the optimizer's moments and the loss are float32 in every mode; what
changes is the towers' arithmetic:

- fp32: IEEE float32 everywhere, also for CUDA matmuls (torch's default). It is the default
  because it is what every existing trial computed: a trial id names one computation, so a new
  default may not quietly change the arithmetic of the trials it names.
- tf32: float32 tensors, CUDA matmuls on TF32 tensor cores (10-bit mantissa products, float32
  accumulation), about 8× faster on an A100/H100 than IEEE fp32. On a CPU the same as fp32.
- bf16 / fp16: the towers' forward (and so their backward) under `torch.autocast` in that type:
  matmuls and attention in 16 bits, reductions such as LayerNorm in float32 (autocast's op lists).
  The towers' outputs are cast to float32 before they are normalised (models.TwoTower), and the
  loss runs outside autocast, so its logits and every tile of the chunked losses are float32.
- fp16 adds dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision Training", §3.2;
  `torch.amp.GradScaler`): the loss is multiplied by a scale S before backward so small gradients
  survive fp16, the gradients are divided by S before anyone reads them, and a step whose scaled
  gradients overflowed is skipped while S halves. Such a step is the scaler's business: it never
  ends the trial as diverged (`Precision.overflowed`; the loop judges it by its loss alone). bf16
  has float32's exponent range and needs no scaling.

Nothing here reads a value on the host: the overflow flag stays a device tensor and goes to the
optimizer's `found_inf`, as the non-finite gate does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp16: this many overflow steps in a row are no overflow any more. Each halves the scale, and
# fp16 spans 2^40 (2^-24 … 2^16), so after 64 halvings from GradScaler's 2^16 no finite gradient
# can overflow: the gradients are NaN whatever the scale, and the trial has diverged.
MAX_OVERFLOW_RUN = 64


def use_tf32_matmuls(enabled: bool) -> None:
    """CUDA float32 matmuls on TF32 tensor cores, or IEEE fp32; process-wide, so every trial sets
    it either way (several trials may share one process). CPU matmuls are never affected."""
    torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"


@dataclass
class Precision:
    """One trial's arithmetic: autocast for the towers, and the fp16 loss scaler."""

    mode: str
    device: torch.device
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def build(cls, mode: str, device: torch.device) -> Precision:
        if mode not in ("fp32", "tf32", *AUTOCAST_DTYPES):
            raise ValueError(f"train.precision={mode!r}: use fp32, tf32, bf16 or fp16")
        if device.type == "cuda":
            use_tf32_matmuls(mode == "tf32")
        scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
        return cls(mode, device, scaler)

    @property
    def dtype(self) -> torch.dtype | None:
        """The towers' autocast type, or None when they run in float32."""
        return AUTOCAST_DTYPES.get(self.mode)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Around the towers' forward only (never around the loss)."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), the loss multiplied by the fp16 loss scale first."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def backward_from(self, outputs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Back-propagate given gradients of `outputs` (gradient caching), scaled the same way."""
        if self.scaler is not None:
            grads = [self.scaler.scale(g) for g in grads]
        torch.autograd.backward(outputs, grads)

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale in place, before anything reads them (grad
        norms, clipping, the update RMS); records this step's overflow for `update`."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    @staticmethod
    def overflowed(grad_norm: torch.Tensor) -> torch.Tensor:
        """Whether this step's unscaled gradients hold an inf or NaN (0-d bool), the same test as
        the scaler's own found_inf: any non-finite entry makes the norm non-finite."""
        return ~torch.isfinite(grad_norm)

    def update(self) -> None:
        """After the optimizer step: halve the scale after an overflow, double it after
        `growth_interval` (2,000) clean steps (GradScaler's defaults)."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The loss scale and its growth tracker (plain floats and ints: weights_only loads them).
        Reading the scale syncs once, at a checkpoint."""
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class OverflowRun:
    """Consecutive fp16 overflow steps, counted on the host as the rows are flushed (within one
    attempt: a resumed trial starts counting again)."""

    def __init__(self) -> None:
        self.length = 0

    def endless(self, overflowed: bool) -> bool:
        """Count one step; whether the run has reached MAX_OVERFLOW_RUN."""
        self.length = self.length + 1 if overflowed else 0
        return self.length >= MAX_OVERFLOW_RUN

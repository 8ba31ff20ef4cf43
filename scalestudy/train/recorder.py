"""Per-step metrics kept where they are computed, and brought to the host once per flush.

On a GPU every `.item()` is a device→host synchronisation that stops the CPU from queueing the next
step's kernels. So a step's metrics stay 0-d tensors on the device; the recorder stacks each step's
into one vector, and `drain()` copies every pending step's vector to the host in one transfer. The
non-finite check happens there too: the first step whose loss or gradient norm is not finite ends
the trial as diverged. Until the host sees it, the optimizer has been skipping every update on the
device since that step (scalestudy.train.loop gates `optimizer.found_inf` with a sticky flag), so
the model the trial evaluates at the end is the model from before the bad step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

# Per-step columns that are flags, not numbers.
FLAGS = frozenset({"is_spike", "is_loss_spike"})
# A step is bad when one of these is not finite.
MUST_BE_FINITE = ("loss", "grad_norm")


@dataclass
class StepRecorder:
    host: list[dict[str, Any]] = field(default_factory=list)
    device: list[tuple[tuple[str, ...], torch.Tensor]] = field(default_factory=list)

    def add(self, host: dict[str, Any], device: dict[str, torch.Tensor]) -> None:
        """One step: `host` values (step, lr, …) as they are; `device` 0-d tensors, stacked now
        (one small kernel) and copied later."""
        keys = tuple(device)
        values = torch.stack([v.detach().reshape(()).to(torch.float64) for v in device.values()]) \
            if keys else torch.zeros(0, dtype=torch.float64)
        self.host.append(host)
        self.device.append((keys, values))

    def __len__(self) -> int:
        return len(self.host)

    def drain(self) -> tuple[list[dict[str, Any]], int | None]:
        """The pending rows as host values, and the index of the first bad row (None if none).

        Rows after a bad one are dropped: the trial stopped there (its later updates were skipped).
        """
        if not self.host:
            return [], None
        # One device→host copy for every pending step (all steps of a trial share their keys).
        matrix = torch.stack([values for _, values in self.device]).cpu().tolist()
        rows = []
        bad = None
        for i, (host, (keys, _), values) in enumerate(zip(self.host, self.device, matrix)):
            row = dict(host)
            for key, value in zip(keys, values):
                row[key] = bool(value) if key in FLAGS else (value if math.isfinite(value) or key in MUST_BE_FINITE else None)
            rows.append(row)
            if bad is None and not all(math.isfinite(row.get(k, 0.0)) for k in MUST_BE_FINITE):
                bad = i
                break
        self.host, self.device = [], []
        return rows, bad

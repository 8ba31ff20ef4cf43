"""Per-step metrics kept where they are computed, and brought to the host once per flush.

On a GPU every `.item()` is a device→host synchronisation that stops the CPU from queueing the next
step's kernels. So a step's metrics stay 0-d tensors on the device; `DeviceRows` stacks each
step's into one vector, and `drain()` copies every pending step's vector to the host in one
transfer. The non-finite check happens there too (`first_bad`): the first step whose loss or
gradient norm is not finite ends the trial as diverged. Until the host sees it, the optimizer has
been skipping every update on the device since that step (`optim.NonFiniteGate` through
`optimizer.found_inf`), so the model the trial evaluates at the end is the one from before it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from scalestudy.train.precision import OverflowRun

# Row columns the host turns from their stacked float form back into what they are.
BOOL_COLUMNS = frozenset({"is_spike", "is_loss_spike", "grad_overflow"})
NULL_IF_NAN = frozenset({"spike_ratio", "loss_spike_ratio", "rms_bias", "rms_temperature"})
# A step is bad when one of these is not finite.
MUST_BE_FINITE = ("loss", "grad_norm")


class DeviceRows:
    """Per-step rows whose values are device tensors, copied to the host once per flush.

    `append` keeps a step's host values (step, lr, …) and copies its one-element tensors into one
    stacked vector per dtype on the device (a float32 vector, a bool one, …: a few ops per step,
    where converting each value to one dtype first took ~80 µs of the tiny model's ~5 ms step);
    `drain` stacks the pending steps, converts them to float64 (exact for the flags and indices
    too) and copies them in one transfer, then restores the column types: `is_*` flags to bool,
    a NaN spike ratio (warm-up) to None, and `rms_max_index` to the parameter's name as
    `rms_max_name`. Every step must give the same columns with the same dtypes and shapes.
    """

    def __init__(self, param_names: Sequence[str] = ()) -> None:
        self.param_names = list(param_names)
        self._host: list[dict[str, Any]] = []
        self._device: list[list[torch.Tensor]] = []
        self._columns: list[str] | None = None
        self._layout: tuple[tuple[torch.dtype, torch.Size], ...] = ()
        self._groups: list[list[int]] = []  # column positions stacked together, one list per dtype
        self._at: list[int] = []  # where each column sits in the grouped order

    def __len__(self) -> int:
        return len(self._host)

    def _plan(self, columns: list[str], values: list[torch.Tensor]) -> None:
        wide = [c for c, v in zip(columns, values) if v.numel() != 1]
        if wide:
            raise ValueError(f"step row values must hold one number each; {wide} do not")
        self._columns = columns
        self._layout = tuple((v.dtype, v.shape) for v in values)
        groups: dict[tuple[torch.dtype, torch.Size], list[int]] = {}
        for i, key in enumerate(self._layout):
            groups.setdefault(key, []).append(i)
        self._groups = list(groups.values())
        grouped = [i for group in self._groups for i in group]
        self._at = sorted(range(len(grouped)), key=grouped.__getitem__)

    def append(self, host: Mapping[str, Any], device: Mapping[str, torch.Tensor]) -> None:
        columns, values = list(device), list(device.values())
        if self._columns is None:
            self._plan(columns, values)
        elif columns != self._columns:
            raise ValueError(f"step row columns changed from {self._columns} to {columns}")
        elif tuple((v.dtype, v.shape) for v in values) != self._layout:
            raise ValueError(f"step row dtypes or shapes changed: {self._layout} then "
                             f"{tuple((v.dtype, v.shape) for v in values)}")
        self._host.append(dict(host))
        with torch.no_grad():  # stack copies: a value changed in place later leaves the row as is
            self._device.append([torch.stack([values[i] for i in group]) for group in self._groups])

    def drain(self) -> list[dict[str, Any]]:
        """The pending rows as plain Python values (one device→host copy), oldest first."""
        if not self._host:
            return []
        assert self._columns is not None
        steps = len(self._device)
        grouped = torch.cat([torch.stack([step[g] for step in self._device]).reshape(steps, -1)
                             .to(torch.float64) for g in range(len(self._groups))], dim=1).tolist()
        values = [[vector[i] for i in self._at] for vector in grouped]
        rows = []
        for host, vector in zip(self._host, values):
            row = dict(host)
            for column, value in zip(self._columns, vector):
                if column in BOOL_COLUMNS:
                    row[column] = bool(value)
                elif column in NULL_IF_NAN and math.isnan(value):
                    row[column] = None
                elif column == "rms_max_index":
                    row["rms_max_name"] = self.param_names[int(value)] if math.isfinite(value) else None
                else:
                    row[column] = value
            rows.append(row)
        self._host.clear()
        self._device.clear()
        return rows


def first_bad(rows: Sequence[Mapping[str, Any]], overflows: OverflowRun | None = None) -> int | None:
    """The index of the first row that ends the trial, or None: a non-finite loss or gradient norm,
    except that an fp16 step whose gradients overflowed (`grad_overflow`) is judged by its loss
    alone — the loss scaler skipped that step and lowered the scale (train.precision), which is no
    divergence — unless the overflows go on for MAX_OVERFLOW_RUN steps in a row (`overflows`
    counts them across flushes)."""
    for i, row in enumerate(rows):
        skipped = bool(row.get("grad_overflow"))
        checked = ("loss",) if skipped else MUST_BE_FINITE
        if not all(math.isfinite(row.get(column, 0.0)) for column in checked):
            return i
        if overflows is not None and overflows.endless(skipped):
            return i
    return None

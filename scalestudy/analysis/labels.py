"""Human names for the study's axes and their values, shared by figures, tables and the summary.

    >>> line_label({"loss.kind": "sigmoid", "optim.beta2": 0.95}, ["loss.kind", "optim.beta2"])
    'sigmoid, β2=0.95'
    >>> line_label({"loss.bias_init": None, "loss.use_bias": False}, ["loss.bias_init", "loss.use_bias"])
    'no bias'
"""

from __future__ import annotations

from typing import Any

import polars as pl

BIAS_AXES = ("loss.bias_init", "loss.use_bias")
SHORT = {
    "loss.kind": "loss",
    "optim.kind": "optimizer",
    "optim.beta2": "β2",
    "optim.lr": "lr",
    "loss.temperature_init": "t₀",
    "loss.bias_init": "b₀",
    "train.batch_size": "B",
    "train.seed": "seed",
}


def _value(value: Any) -> str:
    if value is None:
        return "default"
    if value == "neg_log_batch":
        return "−log B"
    if isinstance(value, float):
        return f"{value:g}".replace("-", "−")
    if isinstance(value, str):
        try:
            return f"{float(value):g}".replace("-", "−")
        except ValueError:
            return value
    return str(value)


def axis_name(axis: str) -> str:
    return SHORT.get(axis, axis.rsplit(".", 1)[-1])


def line_label(row: dict[str, Any], keys: list[str]) -> str:
    """A short label of one group: loss kind by its name, other axes as name=value.

    The sigmoid bias is one setting spread over two keys: use_bias=false reads "no bias" whatever
    bias_init says, otherwise b₀ shows the init (−log B for neg_log_batch). Loss variants at
    their plain setting (nothing masked, default negative weight) say nothing, so a variant's
    label names only what differs from the SigLIP loss.
    """
    parts: list[str] = []
    for key in keys:
        value = row.get(key)
        if key == "loss.kind":
            parts.append(str(value))
        elif key == "loss.use_bias":
            if value is False:
                parts.append("no bias")
        elif key == "loss.bias_init" and row.get("loss.use_bias") is False:
            continue
        elif key == "loss.negative_mask_ratio":
            if value:
                parts.append(f"{float(value):.0%} negatives masked")
        elif key == "loss.negative_weight":
            if value is not None:
                parts.append(f"negatives weighted {_value(value)}")
        else:
            parts.append(f"{axis_name(key)}={_value(value)}")
    return ", ".join(parts) or "all trials"


def group_labels(frame: pl.DataFrame, keys: list[str]) -> dict[tuple[Any, ...], str]:
    """Label of every distinct combination of `keys` in `frame`, keyed by the value tuple."""
    if not keys:
        return {(): "all trials"}
    rows = frame.select(keys).unique(maintain_order=True).to_dicts()
    return {tuple(r[k] for k in keys): line_label(r, keys) for r in rows}


def percent(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f} %"

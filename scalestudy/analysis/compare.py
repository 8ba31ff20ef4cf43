"""Comparisons of two settings of one axis, in pairs where trials pair, Holm-corrected.

Trials that differ only in the compared axis — the same seed and every other axis equal — see the
same data order and init, so their difference is one pair and the seed's luck cancels
(`stats.paired_test`). Per group of the remaining axes (e.g. each batch size) the comparison is
first − second of a metric with a paired t-interval and p-value; the groups' p-values are then
Holm-adjusted together, so "sigmoid beats softmax at B = 128" is claimed only when it survives
the number of batch sizes looked at. Groups where no trials pair fall back to Welch's t.

    >>> frame = pl.DataFrame({"loss.kind": ["sigmoid", "softmax"] * 3, "train.seed": [0, 0, 1, 1, 2, 2],
    ...                       "acc": [0.52, 0.50, 0.47, 0.45, 0.61, 0.60]})
    >>> row = compare(frame, "loss.kind", "sigmoid", "softmax", "acc", [], ["train.seed"]).row(0, named=True)
    >>> round(row["diff"], 3), row["n"], row["method"]
    (0.017, 3, 'paired t')
"""

from __future__ import annotations

import math

import polars as pl

from scalestudy.analysis.stats import LEVEL, holm, paired_test, welch_test

SCHEMA = {
    "first": pl.String, "second": pl.String, "paired": pl.Boolean, "n": pl.Int64,
    "n_first": pl.Int64, "n_second": pl.Int64, "mean_first": pl.Float64,
    "mean_second": pl.Float64, "diff": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
    "p": pl.Float64, "p_holm": pl.Float64, "method": pl.String,
}


def compare_one(frame: pl.DataFrame, axis: str, first: object, second: object, metric: str,
                pair_on: list[str], level: float = LEVEL) -> dict:
    """first − second of `metric` over `frame` (one group): paired on `pair_on` when any trials
    pair, else Welch's t over all of each side. A row of SCHEMA without p_holm.

    Trials with the same pairing key on one side (only `include` points that differ in an unswept
    key can do that) are averaged into one member of the pair.
    """
    value = pl.col(metric).cast(pl.Float64)
    sides = {}
    for name, setting in (("first", first), ("second", second)):
        rows = frame.filter(pl.col(axis) == setting).filter(value.is_not_null() & value.is_finite())
        sides[name] = rows.with_columns(value)
    pairs = (sides["first"].group_by(pair_on).agg(pl.col(metric).mean()).join(
        sides["second"].group_by(pair_on).agg(pl.col(metric).mean()), on=pair_on,
        suffix="_second", nulls_equal=True) if pair_on else pl.DataFrame())
    if pairs.height:
        a, b = pairs[metric].to_numpy(), pairs[f"{metric}_second"].to_numpy()
        test = paired_test(a, b, level)
    else:
        a, b = sides["first"][metric].to_numpy(), sides["second"][metric].to_numpy()
        test = welch_test(a, b, level)
    return {
        "first": str(first), "second": str(second), "paired": bool(pairs.height),
        "n": test.n, "n_first": int(sides["first"].height), "n_second": int(sides["second"].height),
        "mean_first": float(a.mean()) if a.size else None,
        "mean_second": float(b.mean()) if b.size else None,
        "diff": None if math.isnan(test.mean) else test.mean, "ci_low": test.low,
        "ci_high": test.high, "p": test.p, "method": test.method,
    }


def compare(frame: pl.DataFrame, axis: str, first: object, second: object, metric: str,
            by: list[str], pair_on: list[str], level: float = LEVEL) -> pl.DataFrame:
    """first − second of `metric` per group of `by` (one row each, sorted by `by`), paired on
    `pair_on`, with `p_holm`: the p-values Holm-adjusted over the groups."""
    groups = frame.group_by(by, maintain_order=True) if by else [((), frame)]
    rows = []
    for key, group in groups:
        rows.append({**dict(zip(by, key)),
                     **compare_one(group, axis, first, second, metric, pair_on, level)})
    rows = [r for r in rows if r["n_first"] and r["n_second"]]
    for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adjusted
    schema = {**{b: frame.schema[b] for b in by}, **SCHEMA}
    out = pl.DataFrame(rows, schema=schema)
    return out.sort(by, nulls_last=True) if by else out

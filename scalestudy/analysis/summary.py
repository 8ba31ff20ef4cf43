"""The report's generated findings: short sentences with numbers and confidence intervals.

Which loss wins at which batch size and by how much (the difference of seed means with a
bootstrap CI; "no clear winner" when the CI contains zero), the best and worst settings, the
fits, where training was unstable, and what was left out of the curves.
"""

from __future__ import annotations

import polars as pl

from scalestudy.analysis.aggregate import LEVEL, LOSS_AXIS, Aggregates, bootstrap_means, curve_trials
from scalestudy.analysis.fits import FitFailure, FitSummary
from scalestudy.analysis.labels import axis_name, line_label, percent
from scalestudy.store import RESULTS, Status


def counts_line(agg: Aggregates) -> str:
    status = agg.trials["status"]
    n = {s.value: int((status == s).sum()) for s in (Status.DONE, Status.DIVERGED, Status.FAILED)}
    unfinished = agg.trials.height - sum(n.values())
    parts = [f"{count} {name}" for name, count in n.items()]
    if unfinished:
        parts.append(f"{unfinished} not finished (pending, running or preempted)")
    rule = ("diverged seeds are included in the curves (their last evaluation before the bad "
            "step); `--exclude-diverged` leaves them out" if agg.include_diverged
            else "diverged seeds are excluded from the curves (`--exclude-diverged`)")
    line = (f"{agg.trials.height} trials: {', '.join(parts)}. Failed trials have no result and "
            f"enter no curve; {rule}.")
    if agg.other_trials:
        line += (f" {agg.other_trials} more trial(s) in this directory are not in the study as "
                 "last run (an earlier sweep, or a scalestudy version whose configs hash to other "
                 "trial ids) and are left out; results.parquet has them (in_study = false).")
    return line


def loss_differences(agg: Aggregates, metric: str = "zeroshot_top1", n_boot: int = 2000) -> pl.DataFrame:
    """sigmoid − softmax of the seed means of `metric` per group of the other axes, with its CI.

    Empty unless the study compares exactly two losses. Each replicate draws both losses' seeds
    independently (bootstrap_means); the CI is the percentile interval of the replicate differences.
    """
    lay = agg.layout
    used = curve_trials(agg.trials, agg.include_diverged)
    if LOSS_AXIS not in lay.hue or used[LOSS_AXIS].n_unique() != 2:
        return pl.DataFrame()
    # The proposed loss first (sigmoid − softmax, as SigLIP reports it), else alphabetical.
    first, second = sorted(used[LOSS_AXIS].unique().to_list(), key=lambda k: (k != "sigmoid", k))
    # `_all` is a constant key, so a study with no other axis compares through the same joins.
    keys = [a for a in lay.by if a != LOSS_AXIS] + ["_all"]
    used = used.with_columns(pl.lit(0).alias("_all"))
    stats = agg.curves[metric].with_columns(pl.lit(0).alias("_all"))
    reps = bootstrap_means(used, keys + [LOSS_AXIS], metric, n_boot=n_boot)

    def side(frame: pl.DataFrame, kind: str, suffix: str) -> pl.DataFrame:
        picked = frame.filter(pl.col(LOSS_AXIS) == kind).drop(LOSS_AXIS)
        return picked.rename({c: c + suffix for c in picked.columns if c not in keys + ["rep"]})

    tail = (1 - LEVEL) / 2
    ci = (side(reps, first, "").join(side(reps, second, "_b"), on=keys + ["rep"], nulls_equal=True)
          .group_by(keys).agg(
              (pl.col("mean") - pl.col("mean_b")).quantile(tail, "linear").alias("ci_low"),
              (pl.col("mean") - pl.col("mean_b")).quantile(1 - tail, "linear").alias("ci_high")))
    means = side(stats.select(keys + [LOSS_AXIS, "mean", "n"]), first, "").join(
        side(stats.select(keys + [LOSS_AXIS, "mean", "n"]), second, "_b"), on=keys, nulls_equal=True)
    return (means.join(ci, on=keys, nulls_equal=True)
            .with_columns((pl.col("mean") - pl.col("mean_b")).alias("diff"),
                          pl.lit(first).alias("first"), pl.lit(second).alias("second"))
            .sort(keys, nulls_last=True).drop("_all"))


def _pp(value: float) -> str:
    return f"{100 * value:+.1f}".replace("-", "−") + " pp"


def comparison_lines(agg: Aggregates, metric: str = "zeroshot_top1") -> list[str]:
    diffs = loss_differences(agg, metric)
    if diffs.is_empty():
        return []
    others = [a for a in agg.layout.by if a != LOSS_AXIS]
    lines = []
    for row in diffs.iter_rows(named=True):
        first, second = row["first"], row["second"]
        where = line_label(row, others) if others else "overall"
        ci = f"{LEVEL:.0%} CI {_pp(row['ci_low'])} to {_pp(row['ci_high'])}"
        seeds = f"{row['n']} vs {row['n_b']} seeds"
        if row["ci_low"] > 0 or row["ci_high"] < 0:
            winner, loser = (first, second) if row["diff"] > 0 else (second, first)
            lines.append(f"{where}: {winner} beats {loser} by {_pp(abs(row['diff']))[1:]} "
                         f"({first} − {second} = {_pp(row['diff'])}, {ci}; {seeds})")
        else:
            lines.append(f"{where}: no clear winner ({first} − {second} = {_pp(row['diff'])}, "
                         f"{ci} contains 0; {seeds})")
    return [f"Zero-shot top-1, {diffs['first'][0]} against {diffs['second'][0]}:"] + [
        "  " + line for line in lines]


def ranking_lines(agg: Aggregates, metric: str = "zeroshot_top1") -> list[str]:
    stats = agg.curves.get(metric)
    if stats is None or stats.is_empty():
        return ["No trial has a zero-shot result yet."]
    ordered = stats.sort("mean", descending=True)
    keys = agg.layout.by

    def describe(row: dict) -> str:
        return (f"{line_label(row, keys)}: {percent(row['mean'])} ({LEVEL:.0%} CI "
                f"{percent(row['ci_low'])}–{percent(row['ci_high'])}, n={row['n']})")

    lines = [f"Highest zero-shot top-1: {describe(ordered.row(0, named=True))}."]
    if ordered.height > 1:
        lines.append(f"Lowest: {describe(ordered.row(-1, named=True))}.")
    return lines


def instability_lines(agg: Aggregates) -> list[str]:
    frame = agg.instability.filter(pl.col("spike_rate_per_1k").is_not_null())
    if frame.is_empty():
        return []
    keys = agg.layout.by
    worst = frame.sort("spike_rate_per_1k", descending=True).row(0, named=True)
    # No ratio when no step was flagged (or the trials were shorter than the monitor's window).
    ratio = worst["max_spike_ratio"]
    lines = [f"Most grad-norm spikes: {line_label(worst, keys)} with "
             f"{worst['spike_rate_per_1k']:.1f} per 1,000 steps"
             + (f" (worst spike {ratio:.1f}× the running median)." if ratio is not None else ".")]
    diverged = frame.filter(pl.col("fraction_diverged") > 0)
    if diverged.height:
        shown = "; ".join(f"{line_label(r, keys)}: {r['fraction_diverged']:.0%} of {r['n']}"
                          for r in diverged.iter_rows(named=True))
        lines.append(f"Seeds diverged in {diverged.height} setting(s): {shown}.")
    else:
        lines.append("No seed diverged.")
    ran = agg.trials.filter(pl.col("status").is_in(RESULTS))
    for axis in (LOSS_AXIS, "optim.beta2"):
        if axis in agg.layout.hue and ran[axis].n_unique() > 1:
            pooled = ran.group_by(axis).agg(pl.col("spike_rate_per_1k").mean()).sort(axis)
            shown = ", ".join(f"{line_label(r, [axis])}: "
                              + ("n/a" if r["spike_rate_per_1k"] is None else f"{r['spike_rate_per_1k']:.2f}")
                              for r in pooled.iter_rows(named=True))
            lines.append(f"Spikes per 1,000 steps by {axis_name(axis)}, over all other settings: "
                         f"{shown}.")
    return lines


def findings(agg: Aggregates, fits: list[FitSummary | FitFailure]) -> list[str]:
    """The summary, one finding per item (items may have indented sub-lines)."""
    items = [counts_line(agg)]
    items += ranking_lines(agg)
    comparison = comparison_lines(agg)
    if comparison:
        items.append("\n".join(comparison))
    if fits:
        items.append("\n".join(["Saturating power-law fits of zero-shot top-1 against batch size:"]
                               + ["  " + f.describe() for f in fits]))
    items += instability_lines(agg)
    return items

"""Aggregation over the store, lazily, with polars: the numbers behind every figure and table.

Two frames: the trials (`results.parquet`, one row per trial, every config key a dotted column)
and the steps (every trial's `metrics/*.parquet`, one long frame with a `trial_id` column). Both are
scanned lazily, so a study of 1,000 trials × 10,000 steps aggregates in seconds
(benchmarks/bench_report.py) — the step frame is only ever reduced (binned, grouped), never
materialised whole.

Over seeds: mean, std and a percentile bootstrap confidence interval of the mean, per group of any
axes. Trials that failed have no result and never enter a curve; trials that diverged do unless
`include_diverged=False`; both are counted per group so a figure can say what it left out.

    >>> frame = pl.DataFrame({"loss.kind": ["a", "a", "a"], "acc": [0.1, 0.2, 0.3]})
    >>> seed_stats(frame, ["loss.kind"], "acc")["mean"].round(3).to_list()
    [0.2]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from scalestudy.errors import StoreError
from scalestudy.store import ENDS, RESULTS, STEP_SCHEMA, Status, TrialStore, read_parts

SEED_AXIS = "train.seed"
BATCH_AXIS = "train.batch_size"
LOSS_AXIS = "loss.kind"
# Confidence level of every interval in the report.
LEVEL = 0.95

def scan_trials(run_dir: str | Path) -> pl.LazyFrame:
    """The per-trial frame of a run directory, lazily (its results.parquet)."""
    path = Path(run_dir) / "results.parquet"
    if not path.exists():
        raise StoreError(
            f"{path} does not exist; run `scalestudy run STUDY.yaml` (or `scalestudy report "
            f"{run_dir}`, which writes it from the trial directories) first"
        )
    return pl.scan_parquet(path)


def scan_steps(run_dir: str | Path, trial_ids: list[str]) -> pl.LazyFrame:
    """One long lazy frame of the given trials' per-step rows, with a `trial_id` column.

    A finished trial has one compacted metrics part and is scanned as is. A trial with several
    parts (running, failed, preempted) is read through the store's own reader, which drops steps
    repeated across parts (a resume interrupted between rewriting and deleting a part).
    """
    trials = Path(run_dir) / "trials"
    single: list[str] = []
    multi: list[pl.LazyFrame] = []
    for tid in trial_ids:
        parts = TrialStore(trials / tid).metric_parts()
        if len(parts) == 1:
            single.append(str(parts[0]))
        elif parts:
            frame = read_parts(parts).with_columns(pl.lit(tid).alias("trial_id"))
            multi.append(_conform(frame.lazy()))
    frames = multi
    if single:
        scan = pl.scan_parquet(single, schema=STEP_SCHEMA, missing_columns="insert",
                               extra_columns="ignore", include_file_paths="_path")
        frames = [scan.with_columns(
            pl.col("_path").str.extract(r"([^/\\]+)[/\\]metrics[/\\][^/\\]+$").alias("trial_id")
        ).drop("_path")] + multi
    if not frames:
        return pl.LazyFrame(schema={**STEP_SCHEMA, "trial_id": pl.String()})
    return pl.concat(frames, how="vertical")


def _conform(frame: pl.LazyFrame) -> pl.LazyFrame:
    names = frame.collect_schema().names()
    return frame.select(
        [pl.col(c).cast(t) if c in names else pl.lit(None, t).alias(c) for c, t in STEP_SCHEMA.items()]
        + [pl.col("trial_id")]
    )


def curve_trials(trials: pl.DataFrame, include_diverged: bool = True) -> pl.DataFrame:
    """The trials that enter curves: finished with a result; diverged ones only when included."""
    statuses = RESULTS if include_diverged else {Status.DONE}
    return trials.filter(pl.col("status").is_in(statuses))


def bootstrap_means(frame: pl.DataFrame, by: list[str], value: str, n_boot: int = 2000,
                    seed: int = 0) -> pl.DataFrame:
    """`n_boot` bootstrap replicates of the mean of `value` per group: columns `by`, rep, mean.

    Each replicate resamples the group's trials (its seeds) with replacement. The random draws
    come from numpy with a fixed seed (reproducible); the resampling and means are polars joins
    and group-bys, so thousands of groups cost no Python loop.
    """
    rows = frame.filter(pl.col(value).is_not_null() & pl.col(value).is_finite())
    rows = rows.sort(by, nulls_last=True).with_columns(pl.int_range(pl.len()).over(by).alias("_i"))
    sizes = rows.group_by(by, maintain_order=True).agg(pl.len().alias("_n"))
    draws = sizes.with_columns(pl.int_ranges(0, pl.col("_n") * n_boot).alias("_k")).explode("_k")
    uniform = np.random.default_rng(seed).random(draws.height)
    draws = draws.with_columns(
        (pl.col("_k") // pl.col("_n")).alias("rep"),
        (pl.Series(uniform) * pl.col("_n")).floor().cast(pl.Int64).alias("_i"),
    )
    picked = draws.join(rows.select(by + ["_i", value]), on=by + ["_i"], nulls_equal=True)
    return picked.group_by(by + ["rep"]).agg(pl.col(value).mean().alias("mean"))


def seed_stats(frame: pl.DataFrame, by: list[str], value: str, level: float = LEVEL,
               n_boot: int = 2000, seed: int = 0) -> pl.DataFrame:
    """Per group of `by`: seeds (n), mean, std, and the bootstrap CI of the mean at `level`.

    With one seed the interval is that one value (zero width): the figure then shows no band,
    which is the honest picture. Percentile bootstrap intervals are too narrow for 2–3 seeds
    (they ignore the uncertainty of the spread itself); more seeds fix that, not a wider formula.
    """
    rows = frame.filter(pl.col(value).is_not_null() & pl.col(value).is_finite())
    stats = rows.group_by(by).agg(
        pl.len().alias("n"),
        pl.col(value).mean().alias("mean"),
        pl.col(value).std().fill_null(0.0).alias("std"),
    )
    tail = (1 - level) / 2
    ci = bootstrap_means(rows, by, value, n_boot, seed).group_by(by).agg(
        pl.col("mean").quantile(tail, "linear").alias("ci_low"),
        pl.col("mean").quantile(1 - tail, "linear").alias("ci_high"),
    )
    return stats.join(ci, on=by, nulls_equal=True).sort(by, nulls_last=True)


def status_counts(trials: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Per group: trials, done, diverged, failed, and unfinished (pending/running/preempted)."""
    status = pl.col("status")
    return trials.group_by(by).agg(
        pl.len().alias("trials"),
        *((status == s).sum().alias(s.value) for s in (Status.DONE, Status.DIVERGED, Status.FAILED)),
        (~status.is_in(ENDS)).sum().alias("unfinished"),
    ).sort(by, nulls_last=True)


def binned_steps(steps: pl.LazyFrame, width: int, x: str = "examples_seen",
                 upto: int | None = None) -> pl.LazyFrame:
    """Each trial's steps reduced to one row per bin of `width` along `x` (examples seen or step).

    Means for smooth quantities, the bin's maximum grad norm and spike ratio (so a one-step spike
    stays visible after reduction), the spike count, and the last temperature and bias.
    `upto` keeps only x ≤ upto (the early part of training).
    """
    if upto is not None:
        steps = steps.filter(pl.col(x) <= upto)
    return (
        steps.group_by("trial_id", ((pl.col(x) - 1) // width).alias("bin"))
        .agg(
            pl.col("step").max(),
            pl.col("examples_seen").max(),
            pl.col("loss").mean(),
            pl.col("grad_norm").mean().alias("grad_norm_mean"),
            pl.col("grad_norm").max().alias("grad_norm_max"),
            pl.col("spike_ratio").max().alias("spike_ratio_max"),
            pl.col("is_spike").sum().alias("spikes"),
            pl.col("temperature").last(),
            pl.col("bias").last(),
            pl.col("rms_max").max(),
            pl.col("lr").mean(),
        )
        .sort("trial_id", "bin")
    )


def instability(trials: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Per group: mean spike rate per 1k steps, worst spike ratio, fraction of seeds diverged.

    Over every trial that trained (done or diverged): instability is the finding, so diverged
    seeds always count here whatever the curves include.
    """
    ran = trials.filter(pl.col("status").is_in(RESULTS))
    return ran.group_by(by).agg(
        pl.len().alias("n"),
        pl.col("spike_rate_per_1k").mean().alias("spike_rate_per_1k"),
        pl.col("max_spike_ratio").max().alias("max_spike_ratio"),
        (pl.col("status") == Status.DIVERGED).mean().alias("fraction_diverged"),
    ).sort(by, nulls_last=True)


@dataclass(frozen=True)
class Layout:
    """How a study's axes map onto a figure: x (batch size when swept), lines, replicates."""

    x: str | None
    hue: list[str]
    seed: str | None

    @property
    def by(self) -> list[str]:
        return self.hue + ([self.x] if self.x else [])


def layout(trials: pl.DataFrame, axes: list[str]) -> Layout:
    """x = train.batch_size when it varies; lines = every other swept key that varies (but the seed).

    A key can be swept without varying (a one-value grid); it would only clutter the legend.
    Keys that are constant still make a line label when nothing varies (one line, not none).
    """
    varying = [a for a in axes if a in trials.columns and trials[a].n_unique() > 1]
    x = BATCH_AXIS if BATCH_AXIS in varying else None
    seed = SEED_AXIS if SEED_AXIS in axes else None
    hue = [a for a in varying if a not in (x, SEED_AXIS)]
    if not hue and LOSS_AXIS in trials.columns:
        hue = [LOSS_AXIS]
    return Layout(x=x, hue=hue, seed=seed)


@dataclass(frozen=True)
class Aggregates:
    """Everything `report` draws and writes, computed once."""

    trials: pl.DataFrame
    other_trials: int  # trials in the directory that the study as last run no longer contains
    layout: Layout
    include_diverged: bool
    counts: pl.DataFrame
    curves: dict[str, pl.DataFrame]
    instability: pl.DataFrame
    traces: pl.DataFrame
    early: pl.DataFrame
    trace_width: int


CURVE_METRICS = ("zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1", "final_loss")
TRACE_BINS = 200
EARLY_FRACTION = 0.2


def aggregate(run_dir: str | Path, axes: list[str], include_diverged: bool = True,
              n_boot: int = 2000) -> Aggregates:
    """Read the store and compute every aggregate of the report (the benchmarked part).

    Trials are the in-study rows of results.parquet; the step frame is binned to at most
    `TRACE_BINS` points per trial over examples seen, plus a finer view of the first
    `EARLY_FRACTION` of training for the early-loss figure.
    """
    everything = scan_trials(run_dir).collect()
    trials = everything.filter(pl.col("in_study"))
    lay = layout(trials, axes)
    by = lay.by
    used = curve_trials(trials, include_diverged)
    curves = {m: seed_stats(used, by, m, n_boot=n_boot) for m in CURVE_METRICS if m in used.columns}
    steps = scan_steps(run_dir, trials["trial_id"].to_list())
    budget = int(trials["examples_seen"].max() or 1)
    width = max(1, -(-budget // TRACE_BINS))
    early_upto = max(1, int(budget * EARLY_FRACTION))
    # One pass over the step files for both reductions (collect_all shares the scan).
    traces, early = pl.collect_all([
        binned_steps(steps, width),
        binned_steps(steps, max(1, -(-early_upto // TRACE_BINS)), upto=early_upto),
    ])
    return Aggregates(
        trials=trials,
        other_trials=everything.height - trials.height,
        layout=lay,
        include_diverged=include_diverged,
        counts=status_counts(trials, by),
        curves=curves,
        instability=instability(trials, by),
        traces=traces,
        early=early,
        trace_width=width,
    )

"""Aggregation over the store, lazily, with polars: the numbers behind every figure and table.

Three frames: the trials (`results.parquet`, one row per trial, every config key a dotted column),
the steps (every trial's `metrics/*.parquet`, one long frame with a `trial_id` column) and the
evaluations during training (every trial's `evals.parquet`, likewise). They are scanned lazily, so
a study of 1,000 trials × 10,000 steps aggregates in seconds (benchmarks/bench_report.py) — the
step frame is only ever reduced (binned, grouped, joined to a few events), never materialised whole.

Over seeds: mean, std and a Student-t confidence interval of the mean (`stats`), per group of any
axes. Trials that failed have no result and never enter a curve; trials that diverged do unless
`include_diverged=False`; both are counted per group so a figure can say what it left out.

    >>> frame = pl.DataFrame({"loss.kind": ["a", "a", "a"], "acc": [0.1, 0.2, 0.3]})
    >>> seed_stats(frame, ["loss.kind"], "acc")["mean"].round(3).to_list()
    [0.2]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from scalestudy.analysis.instability import (
    Knobs,
    SpikeAnalysis,
    knob_effects,
    spike_analysis,
)
from scalestudy.analysis.stats import LEVEL, group_t_stats, t_columns
from scalestudy.errors import StoreError
from scalestudy.store import ENDS, RESULTS, STEP_SCHEMA, Status, TrialStore, read_parts

SEED_AXIS = "train.seed"
BATCH_AXIS = "train.batch_size"
LOSS_AXIS = "loss.kind"
# What every interval of the report is, for captions and table headers.
CI_METHOD = f"{LEVEL:.0%} Student-t CI of the mean over seeds"


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


# Evaluation bookkeeping columns; every other column of evals.parquet is a metric (float).
EVAL_KEYS = {"step": pl.Int64(), "examples_seen": pl.Int64()}


def scan_evals(run_dir: str | Path, trial_ids: list[str]) -> pl.LazyFrame:
    """One long lazy frame of the given trials' evaluations (evals.parquet), with `trial_id`.

    Trials evaluate different metrics (per-attribute zero-shot only on the shapes data, none of
    zero-shot on real data without classes), so the scan's schema is the union of the files'
    columns, every metric a Float64; a trial without a column has it null.
    """
    trials = Path(run_dir) / "trials"
    files = [p for tid in trial_ids if (p := TrialStore(trials / tid).evals_path).exists()]
    schema: dict[str, pl.DataType] = dict(EVAL_KEYS)
    for path in files:
        schema.update({c: pl.Float64() for c in pl.read_parquet_schema(path) if c not in schema})
    if not files:
        return pl.LazyFrame(schema={**schema, "trial_id": pl.String()})
    scan = pl.scan_parquet([str(p) for p in files], schema=schema, missing_columns="insert",
                           extra_columns="ignore", include_file_paths="_path")
    return scan.with_columns(
        pl.col("_path").str.extract(r"([^/\\]+)[/\\]evals\.parquet$").alias("trial_id")).drop("_path")


def curve_trials(trials: pl.DataFrame, include_diverged: bool = True) -> pl.DataFrame:
    """The trials that enter curves: finished with a result; diverged ones only when included."""
    statuses = RESULTS if include_diverged else {Status.DONE}
    return trials.filter(pl.col("status").is_in(statuses))


def seed_stats(frame: pl.DataFrame, by: list[str], value: str, level: float = LEVEL) -> pl.DataFrame:
    """Per group of `by`: seeds (n), mean, std, and the Student-t CI of the mean at `level`.

    With one seed there is no interval (ci_low and ci_high null): figures then draw no band and
    tables show none, which is the honest picture (see `stats` for why not the bootstrap).
    """
    rows = frame.filter(pl.col(value).is_not_null() & pl.col(value).is_finite())
    stats = rows.group_by(by).agg(
        pl.len().alias("n"),
        pl.col(value).mean().alias("mean"),
        pl.col(value).std().alias("std"),
    )
    return t_columns(stats, level).sort(by, nulls_last=True)


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

    Means for smooth quantities, the bin's maximum grad norm, spike ratio and update RMS (so a
    one-step spike stays visible after reduction), the counts of both kinds of spike, and the last
    temperature and bias. `upto` keeps only x ≤ upto (the early part of training).
    """
    if upto is not None:
        steps = steps.filter(pl.col(x) <= upto)
    return (
        steps.group_by("trial_id", ((pl.col(x) - 1) // width).alias("bin"))
        .agg(
            pl.col("step").max(),
            pl.col("examples_seen").max(),
            pl.col("loss").mean(),
            pl.col("loss").max().alias("loss_max"),
            pl.col("grad_norm").mean().alias("grad_norm_mean"),
            pl.col("grad_norm").max().alias("grad_norm_max"),
            pl.col("spike_ratio").max().alias("spike_ratio_max"),
            pl.col("is_spike").sum().alias("spikes"),
            pl.col("is_loss_spike").sum().alias("loss_spikes"),
            pl.col("temperature").last(),
            pl.col("bias").last(),
            pl.col("rms_max").max(),
            pl.col("rms_patch_embed").max(),
            pl.col("lr").mean(),
        )
        .sort("trial_id", "bin")
    )


def instability(trials: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Per group: mean grad-norm and loss spike rates per 1k steps, worst ratios, fraction of
    seeds diverged.

    Over every trial that trained (done or diverged): instability is the finding, so diverged
    seeds always count here whatever the curves include.
    """
    ran = trials.filter(pl.col("status").is_in(RESULTS))
    return ran.group_by(by).agg(
        pl.len().alias("n"),
        pl.col("spike_rate_per_1k").mean().alias("spike_rate_per_1k"),
        pl.col("max_spike_ratio").max().alias("max_spike_ratio"),
        pl.col("loss_spike_rate_per_1k").mean().alias("loss_spike_rate_per_1k"),
        pl.col("max_loss_spike_ratio").max().alias("max_loss_spike_ratio"),
        (pl.col("status") == Status.DIVERGED).mean().alias("fraction_diverged"),
    ).sort(by, nulls_last=True)


def setting_extras(trials: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Per group, over trials with a result: how many stalled (final loss at the no-learning
    level, `train.summary`), that level, the mean final loss and the mean duplicate-caption rate."""
    ran = trials.filter(pl.col("status").is_in(RESULTS))
    return ran.group_by(by).agg(
        pl.col("stalled").fill_null(False).sum().alias("stalled"),
        pl.col("no_learning_loss").mean(),
        pl.col("final_loss").mean().alias("final_loss_mean"),
        pl.col("dup_caption_rate").mean(),
    ).sort(by, nulls_last=True)


# Evaluation metrics drawn against training time, in this order; `zeroshot_top1_<attribute>`
# columns (the shapes data's attribute tasks) follow the zero-shot top-1.
EVAL_METRICS = ("zeroshot_top1", "linear_probe_top1")


def eval_metric_names(columns: list[str]) -> list[str]:
    attributes = sorted(c for c in columns if c.startswith("zeroshot_top1_"))
    return [m for m in EVAL_METRICS[:1] if m in columns] + attributes + [
        m for m in EVAL_METRICS[1:] if m in columns]


def eval_curves(evals: pl.DataFrame, trials: pl.DataFrame, by: list[str],
                level: float = LEVEL) -> pl.DataFrame:
    """Accuracy during training per setting: for each metric and evaluation step, the mean and
    t-interval over the setting's seeds. Long format: `by`, metric, step, examples_seen, n, mean,
    ci_low, ci_high. Settings evaluate at the same steps (same eval_every and batch size); a
    diverged seed's last evaluation (at its bad step) makes a point of its own with n = 1."""
    metrics = [m for m in eval_metric_names(evals.columns) if evals[m].drop_nulls().len()]
    if evals.is_empty() or not metrics:
        return pl.DataFrame()
    long = (evals.select(["trial_id", "step", "examples_seen"] + metrics)
            .unpivot(index=["trial_id", "step", "examples_seen"], on=metrics,
                     variable_name="metric", value_name="value")
            .join(trials.select(["trial_id"] + by), on="trial_id"))
    ok = pl.col("value").is_not_null() & pl.col("value").is_finite()
    stats = long.filter(ok).group_by(by + ["metric", "step"]).agg(
        pl.col("examples_seen").max(), pl.len().alias("n"), pl.col("value").mean().alias("mean"),
        pl.col("value").std().alias("std"))
    order = {m: i for i, m in enumerate(metrics)}
    return (t_columns(stats, level).drop("std")
            .with_columns(pl.col("metric").replace_strict(order, return_dtype=pl.Int64).alias("_o"))
            .sort(["_o"] + by + ["step"], nulls_last=True).drop("_o"))


TRACE_VALUES = ["loss", "temperature", "bias"]


def setting_traces(traces: pl.DataFrame, trials: pl.DataFrame, by: list[str],
                   level: float = LEVEL) -> pl.DataFrame:
    """Loss, temperature and bias per setting over training: per bin of examples seen, the mean
    and t-interval over the setting's seeds (from the per-trial bins, which share their edges)."""
    if traces.is_empty():
        return pl.DataFrame()
    joined = traces.join(trials.select(["trial_id"] + by), on="trial_id")
    return group_t_stats(joined, by + ["bin"], TRACE_VALUES, level,
                         extra=[pl.col("examples_seen").max(), pl.col("step").max()])


@dataclass(frozen=True)
class Layout:
    """How a study's axes map onto a figure: x (batch size when swept), lines, replicates."""

    x: str | None
    hue: list[str]
    seed: str | None

    @property
    def by(self) -> list[str]:
        return self.hue + ([self.x] if self.x else [])


def _follows(trials: pl.DataFrame, key: str, x: str) -> bool:
    """Whether `key` and `x` determine each other in these trials (a lock-step zip)."""
    pairs = trials.select(key, x).unique()
    return pairs.height == trials[key].n_unique() == trials[x].n_unique()


def layout(trials: pl.DataFrame, axes: list[str]) -> Layout:
    """x = train.batch_size when it varies; lines = every other swept key that varies (but the seed).

    A key can be swept without varying (a one-value grid); it would only clutter the legend, and so
    would a key zipped in lock-step with the batch size (e.g. train.eval_every scaled to it: one
    value per batch size and the reverse), which adds no line the x axis does not already tell.
    Keys that are constant still make a line label when nothing varies (one line, not none).
    """
    varying = [a for a in axes if a in trials.columns and trials[a].n_unique() > 1]
    x = BATCH_AXIS if BATCH_AXIS in varying else None
    seed = SEED_AXIS if SEED_AXIS in axes else None
    hue = [a for a in varying if a not in (x, SEED_AXIS) and not (x and _follows(trials, a, x))]
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
    extras: pl.DataFrame  # stalled, no-learning loss, duplicate-caption rate per setting
    traces: pl.DataFrame
    early: pl.DataFrame
    trace_width: int
    setting_traces: pl.DataFrame
    evals: pl.DataFrame  # accuracy during training per setting (eval_curves), empty without evals
    spikes: SpikeAnalysis | None  # None unless some trial has loss spikes and the update RMS
    knobs: Knobs  # effect of each swept instability knob (knob_effects); empty frames when none


CURVE_METRICS = ("zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1", "final_loss",
                 "linear_probe_top1")
TRACE_BINS = 200
EARLY_FRACTION = 0.2


def aggregate(run_dir: str | Path, axes: list[str], include_diverged: bool = True) -> Aggregates:
    """Read the store and compute every aggregate of the report (the benchmarked part).

    Trials are the in-study rows of results.parquet; the step frame is binned to at most
    `TRACE_BINS` points per trial over examples seen, plus a finer view of the first
    `EARLY_FRACTION` of training for the early-loss figure; the evaluations are averaged over
    seeds per step; loss spikes are related to the update RMS before them (`instability`).
    """
    everything = scan_trials(run_dir).collect()
    trials = everything.filter(pl.col("in_study"))
    lay = layout(trials, axes)
    by = lay.by
    used = curve_trials(trials, include_diverged)
    curves = {m: seed_stats(used, by, m) for m in CURVE_METRICS if m in used.columns}
    ids = trials["trial_id"].to_list()
    steps = scan_steps(run_dir, ids)
    budget = int(trials["examples_seen"].max() or 1)
    width = max(1, -(-budget // TRACE_BINS))
    early_upto = max(1, int(budget * EARLY_FRACTION))
    # One pass over the step files for both reductions (collect_all shares the scan).
    traces, early, evals = pl.collect_all([
        binned_steps(steps, width),
        binned_steps(steps, max(1, -(-early_upto // TRACE_BINS)), upto=early_upto),
        scan_evals(run_dir, used["trial_id"].to_list()),
    ])
    ran = trials.filter(pl.col("status").is_in(RESULTS))
    return Aggregates(
        trials=trials,
        other_trials=everything.height - trials.height,
        layout=lay,
        include_diverged=include_diverged,
        counts=status_counts(trials, by),
        curves=curves,
        instability=instability(trials, by),
        extras=setting_extras(trials, by),
        traces=traces,
        early=early,
        trace_width=width,
        setting_traces=setting_traces(traces, used, by),
        evals=eval_curves(evals, used, by),
        spikes=spike_analysis(scan_steps(run_dir, ran["trial_id"].to_list()), ran),
        knobs=knob_effects(ran, axes),
    )

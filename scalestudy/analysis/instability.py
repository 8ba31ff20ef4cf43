"""Does the update RMS predict loss spikes? Tests of Wortsman et al. 2023's mechanism, and the
effect of each instability knob, from the store's per-step and per-trial columns.

Wortsman et al. 2023 (§3.4, "Stable and low-precision training for large-scale vision-language
models") trace loss spikes to Adam's second-moment estimate falling out of date: the update RMS,
RMS_t = sqrt(mean(g_t² / u_t)), rises well above 1 (its steady value), and loss spikes follow
1–8 iterations later. Three reusable analyses ask whether a study's runs show that:

- `event_triggered_average`: the update RMS (rms_max, rms_patch_embed) at steps −20…+20 around
  each loss-spike onset, mean and t-band over the events. The mechanism predicts a bump before 0.
- `spike_prediction`: the predictor "rms_max > r at any of steps t−8…t−1" fires at step t; its
  recall is the share of loss-spike onsets it fires on, its precision the share of its alarms
  (runs of consecutive firing steps, one per RMS excursion) that contain an onset, for a few r.
  The control shuffles the onsets within each trial (same count per trial, times drawn at random,
  fixed seed) and reports the chance precision and recall; precision / control precision (the
  lift) says how much the RMS adds to knowing the spike rate.
- `knob_effects`: for each swept knob (optim.beta2, optim.kind, optim.lr, loss.kind), its effect
  on the loss-spike rate, the fraction diverged and the final zero-shot accuracy, each value
  against a reference value, paired by seed (and every other axis) where trials pair.

A loss-spike *onset* is a flagged step (`is_loss_spike`, loss > k × its running median) whose
previous step is not flagged: a spike that stays above the threshold for three steps is one event.
Every step is recorded (README, per-step columns), so "steps t−8…t−1" are rows by step number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from scalestudy.analysis.compare import compare_one
from scalestudy.analysis.stats import (
    LEVEL,
    fisher_exact,
    group_t_stats,
    holm,
    mcnemar_exact,
    t_interval,
    wilson,
)
from scalestudy.store import Status

# Wortsman et al. 2023 §3.4 see loss spikes 1–8 iterations after the second-moment estimate
# falls out of date: the predictor looks back over exactly that lag.
LOOKBACK = 8
# RMS levels to test: 1 is Adam's steady state (u_t tracks g_t²), 1.5–5 are increasingly rare
# excursions (StableAdamW clips updates whose RMS exceeds 1).
THRESHOLDS = (1.5, 2.0, 3.0, 5.0)
WINDOW = 20  # steps either side of an event in the event-triggered average
# Shuffles of the spike times: the smallest permutation p-value is 1 / (1 + N_SHUFFLES), which
# must stay below 0.05 after Holm's factor of len(THRESHOLDS) (4 / 201 = 0.02); each shuffle
# costs about 3 ms per 1,000 trials with spikes.
N_SHUFFLES = 200
RMS_COLUMNS = ("rms_max", "rms_patch_embed")
# Knobs whose effect on instability is reported when swept, in this order (reference value first).
KNOBS = ("optim.beta2", "optim.kind", "optim.lr", "loss.kind")
# (column, kind): continuous metrics get paired t-tests, the binary one exact tests.
KNOB_METRICS = (("loss_spike_rate_per_1k", "continuous"), ("diverged", "binary"),
                ("collapse_fraction", "continuous"), ("zeroshot_top1", "continuous"))


def in_store_order(steps: pl.LazyFrame) -> bool:
    """Whether the rows come trial by trial, each trial's steps ascending one at a time: how
    `aggregate.scan_steps` reads a run directory (one trial's parts after another, every step
    recorded). Then "the previous step" is the previous row and a window of steps is a window of
    rows, which the fast path uses; otherwise the analyses sort and window by step number."""
    return _in_order(_order_check(steps).collect())


def _order_check(steps: pl.LazyFrame) -> pl.LazyFrame:
    new = _new_trial()
    return steps.select(((pl.col("step").diff() == 1) | new).all().alias("consecutive"),
                        new.sum().alias("blocks"), pl.col("trial_id").n_unique().alias("trials"))


def _in_order(check: pl.DataFrame) -> bool:
    row = check.row(0, named=True)
    return bool(row["consecutive"]) and row["blocks"] == row["trials"]


def _new_trial() -> pl.Expr:
    """True on the first row of each trial's block of rows."""
    return (pl.col("trial_id") != pl.col("trial_id").shift(1)).fill_null(True)


def _flagged_steps(steps: pl.LazyFrame, columns: list[str], ordered: bool) -> pl.LazyFrame:
    """`columns` of the steps with `_onset` (a loss-spike onset: flagged, the trial's previous
    recorded step not), `_new` (a trial's first row) and `_trial` (its block number, an integer
    key that joins and groups faster than the id), in trial blocks with steps ascending."""
    flagged = pl.col("is_loss_spike").fill_null(False)
    rows = steps.select(list(dict.fromkeys(["trial_id", "step", "is_loss_spike"] + columns)))
    if not ordered:
        rows = rows.sort("trial_id", "step")
    new = _new_trial()
    return rows.with_columns(new.alias("_new"), new.cum_sum().alias("_trial"),
                             (flagged & ~(flagged.shift(1).fill_null(False) & ~new)).alias("_onset"))


def loss_spike_onsets(steps: pl.LazyFrame, ordered: bool = False) -> pl.LazyFrame:
    """(trial_id, step) of every loss-spike onset: a flagged step whose previous step is not.
    `ordered`: the rows are known to be in store order (`in_store_order`), so no sort is needed."""
    return _flagged_steps(steps, [], ordered).filter(pl.col("_onset")).select("trial_id", "step")


def _triggered_rows(steps: pl.LazyFrame, events: pl.LazyFrame, values: list[str], window: int,
                    key: str, near_onsets: bool = False) -> pl.LazyFrame:
    """`values` of the steps at offsets −window…+window from each event, joined on (key, step).

    `near_onsets`: the events are the steps' own `_onset` rows in trial blocks, steps ascending;
    then only rows within `window` rows of an onset can match (a step within `window` steps of it
    is at most `window` rows away), so the join sees those alone, not every step.
    """
    offsets = pl.LazyFrame({"offset": np.arange(-window, window + 1)})
    wanted = (events.select(key, pl.col("step").alias("_event")).join(offsets, how="cross")
              .with_columns((pl.col("_event") + pl.col("offset")).alias("step")))
    if near_onsets:
        near = pl.col("_onset").cast(pl.Int8).rolling_max(2 * window + 1, center=True, min_samples=1)
        steps = steps.filter(near > 0)
    return steps.select([key, "step"] + values).join(wanted, on=[key, "step"], how="inner")


def event_triggered_average(steps: pl.LazyFrame, events: pl.DataFrame, values: list[str],
                            window: int = WINDOW, level: float = LEVEL) -> pl.DataFrame:
    """`values` at each offset −window…+window from each event (trial_id, step): per offset, the
    mean, n and t-interval over the events that have that step (v, v_n, v_ci_low, v_ci_high).

    Events near the start or end of a trial contribute only the offsets they have, so n can vary
    by offset. Events within `window` steps of each other share steps, and events of one trial are
    not independent: the band is over events, read it as a description, not a test.
    """
    present = [v for v in values if v in steps.collect_schema().names()]
    if events.is_empty() or not present:
        return pl.DataFrame()
    rows = _triggered_rows(steps, events.lazy(), present, window, "trial_id")
    return group_t_stats(rows, ["offset"], present, level).sort("offset")


@dataclass(frozen=True)
class PredictionCounts:
    """What `spike_prediction` needs, per trial (arrays over trials; (thresholds, trials) for the
    per-threshold ones), plus the per-step predictor values of the trials with onsets (the only
    ones whose counts a shuffle can change)."""

    thresholds: tuple[float, ...]
    trial_ids: list[str]
    eligible: np.ndarray  # steps with a full lookback
    onsets: np.ndarray  # loss-spike onsets among them
    covered: np.ndarray  # steps where the predictor fires
    alarms: np.ndarray  # alarm episodes: maximal runs of consecutive firing steps
    caught: np.ndarray  # onsets on a firing step (recall's numerator)
    true_alarms: np.ndarray  # alarms that contain an onset (precision's numerator)
    # Per trial with onsets, in trial order: the lookback maximum at each eligible step.
    series: list[tuple[str, np.ndarray]]


def alarm_ids(before: np.ndarray, threshold: float) -> np.ndarray:
    """Per step, the number of the alarm episode it belongs to (1, 2, …), 0 where the predictor
    is silent: an episode is a maximal run of steps whose lookback maximum exceeds `threshold`."""
    firing = before > threshold
    starts = firing & ~np.concatenate([[False], firing[:-1]])
    return np.cumsum(starts) * firing


def _eligible(flagged: pl.LazyFrame, lookback: int, value: str, ordered: bool) -> pl.LazyFrame:
    if ordered:
        first = pl.when(pl.col("_new")).then(pl.col("step")).forward_fill()
        before = pl.col(value).rolling_max(lookback, min_samples=1).shift(1)
    else:
        first = pl.col("step").min().over("trial_id")
        before = pl.col(value).rolling_max_by("step", window_size=f"{lookback}i",
                                              closed="left").over("trial_id")
    return (flagged.with_columns(before.alias("_before"), (pl.col("step") - first >= lookback).alias("_full"))
            .filter(pl.col("_full") & pl.col("_before").is_not_null())
            .select("trial_id", "_trial", "step", "_onset", "_before"))


def eligible_steps(steps: pl.LazyFrame, lookback: int = LOOKBACK, value: str = "rms_max",
                   ordered: bool = False) -> pl.LazyFrame:
    """The steps a predictor can be judged on, with `_onset` (a loss-spike onset) and `_before`
    (the largest `value` at steps t−lookback…t−1): trial_id, _trial (the trial's block number),
    step, _onset, _before, in trial blocks with steps ascending.

    A step is eligible when its whole lookback lies in the trial (t − first step ≥ lookback) and
    some value in it was recorded (trials without the extended monitors have none and drop out).
    With `ordered` (`in_store_order`: consecutive steps, trial by trial) the lookback is the
    previous `lookback` rows, a plain rolling window; otherwise the window is taken by step number
    within each trial (a slower path that gives the same answer on ordered rows, tested).
    """
    return _eligible(_flagged_steps(steps, [value], ordered), lookback, value, ordered)


def _names(rows: pl.LazyFrame) -> pl.LazyFrame:
    """(_trial, trial_id) of each trial block of `eligible_steps` rows."""
    return (rows.filter(pl.col("_trial") != pl.col("_trial").shift(1).fill_null(-1))
            .select("_trial", "trial_id"))


def count_predictions(names: dict[int, str], blocks: np.ndarray, onset: np.ndarray,
                      before: np.ndarray, thresholds: tuple[float, ...] = THRESHOLDS) -> PredictionCounts:
    """`PredictionCounts` from the eligible steps as arrays, in trial blocks with steps ascending
    (`blocks`: each row's trial block number, `names`: block → trial id).

    The predictor fires where `before` (the lookback maximum) exceeds r. An alarm starts where it
    fires and did not on the row before in the same trial; numbering the starts over all rows
    gives every alarm its own id, and an alarm is true when an onset lies on one of its rows.
    Counts per trial come from the flagged rows' positions among the blocks' first rows.
    """
    starts = np.flatnonzero(np.concatenate([[True], blocks[1:] != blocks[:-1]])) if blocks.size else blocks
    k = len(thresholds)
    if not starts.size:
        empty = np.zeros((k, 0), dtype=np.int64)
        return PredictionCounts(tuple(thresholds), [], np.zeros(0, np.int64), np.zeros(0, np.int64),
                                empty, empty, empty, empty, [])
    first_of_trial = np.zeros(blocks.size, dtype=bool)
    first_of_trial[starts] = True

    def per_trial(flags: np.ndarray) -> np.ndarray:
        # The flagged rows' trials, counted: flags are sparse, so this beats summing every row.
        return np.bincount(np.searchsorted(starts, np.flatnonzero(flags), side="right") - 1,
                           minlength=starts.size).astype(np.int64)

    covered, alarms, caught, true_alarms = (np.zeros((k, starts.size), dtype=np.int64) for _ in range(4))
    for i, r in enumerate(thresholds):
        firing = before > r
        start = firing & ~(np.concatenate([[False], firing[:-1]]) & ~first_of_trial)
        hit = firing & onset
        covered[i], alarms[i], caught[i] = per_trial(firing), per_trial(start), per_trial(hit)
        rows = np.flatnonzero(hit)
        # The alarm each caught onset lies in: the last alarm start at or before its row. Each
        # alarm lies in one trial, so distinct alarms hit are counted per trial.
        alarm_of_hit = np.searchsorted(np.flatnonzero(start), rows, side="right")
        distinct = rows[np.concatenate([[True], alarm_of_hit[1:] != alarm_of_hit[:-1]])] if rows.size else rows
        true_alarms[i] = np.bincount(np.searchsorted(starts, distinct, side="right") - 1,
                                     minlength=starts.size)
    ends = np.append(starts[1:], blocks.size)
    onsets = per_trial(onset)
    ids = [names[int(b)] for b in blocks[starts]]
    return PredictionCounts(
        thresholds=tuple(thresholds), trial_ids=ids,
        eligible=(ends - starts).astype(np.int64), onsets=onsets,
        covered=covered, alarms=alarms, caught=caught, true_alarms=true_alarms,
        series=[(ids[j], before[starts[j]:ends[j]]) for j in np.flatnonzero(onsets)],
    )


def prediction_counts(rows: pl.LazyFrame, thresholds: tuple[float, ...] = THRESHOLDS) -> PredictionCounts:
    """Count, per trial, what `spike_prediction` needs, from `eligible_steps` rows."""
    frame, names = pl.collect_all([rows.select("_trial", "_onset", "_before"), _names(rows)])
    return count_predictions(dict(names.iter_rows()), frame["_trial"].to_numpy(),
                             frame["_onset"].to_numpy(), frame["_before"].to_numpy(), thresholds)


def sample_distinct(rng: np.random.Generator, n: int, k: int, rows: int) -> np.ndarray:
    """`rows` independent uniform draws of k distinct integers from range(n): a (rows, k) array.

    Rows drawn with replacement are kept when their k values are distinct and redrawn otherwise,
    which leaves every k-subset (in every order) equally likely; for k² ≫ n, where most rows would
    repeat a value, each row is the first k of a random permutation instead.
    """
    if k == 0:
        return np.zeros((rows, 0), dtype=np.int64)
    if k * k > 4 * n:
        return np.stack([rng.permutation(n)[:k] for _ in range(rows)])
    out = rng.integers(0, n, (rows, k))
    while True:
        ordered = np.sort(out, axis=1)
        bad = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
        if not bad.size:
            return out
        out[bad] = rng.integers(0, n, (bad.size, k))


def shuffled_counts(counts: PredictionCounts, n_shuffles: int = N_SHUFFLES,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Caught onsets and true alarms of each threshold's predictor when every trial's onsets are
    moved to random eligible steps: two (thresholds, n_shuffles) arrays, summed over trials.

    Each shuffle is a uniformly random permutation of the spike times within each trial: its k
    onsets go to k distinct eligible steps, every k-subset equally likely (`sample_distinct`, one
    fixed-seed generator, trials in id order). The alarms stay where they are, so the control
    keeps each trial's spike count and RMS history and breaks only their timing. Trials without
    onsets catch nothing under any shuffle and are skipped.
    """
    rng = np.random.default_rng(seed)
    caught = np.zeros((len(counts.thresholds), n_shuffles), dtype=np.int64)
    true_alarms = np.zeros_like(caught)
    onsets = dict(zip(counts.trial_ids, counts.onsets.tolist()))
    rows = np.arange(n_shuffles)[:, None]
    for trial_id, before in counts.series:
        where = sample_distinct(rng, before.size, onsets[trial_id], n_shuffles)  # (shuffles, k)
        for i, r in enumerate(counts.thresholds):
            alarms = alarm_ids(before, r)
            ids = alarms[where]  # the alarm each shuffled onset falls in (0: none)
            caught[i] += (ids > 0).sum(axis=1)
            hit = np.zeros((n_shuffles, int(alarms.max(initial=0)) + 1), dtype=bool)
            hit[rows, ids] = True  # which alarms got an onset, per shuffle (column 0: none)
            true_alarms[i] += hit[:, 1:].sum(axis=1)
    return caught, true_alarms


def spike_prediction(counts: PredictionCounts, n_shuffles: int = N_SHUFFLES,
                     seed: int = 0) -> pl.DataFrame:
    """Precision and recall of each threshold's predictor, observed and under shuffled onsets.

    An alarm is a run of consecutive steps where the predictor fires (an RMS excursion above r
    makes the next `lookback` steps fire). recall = onsets on a firing step / onsets;
    precision = alarms containing an onset / alarms. Columns: threshold, eligible (steps), onsets,
    alarms, caught, true_alarms, recall, precision, control_recall and control_precision (means
    over `n_shuffles` shuffles: the chance level for this many spikes and alarms), lift =
    precision / control_precision, and p_value: the permutation p-value of catching at least as
    many onsets as observed, (1 + shuffles catching ≥ that many) / (1 + n_shuffles).
    """
    caught_s, true_s = shuffled_counts(counts, n_shuffles, seed)
    onsets = int(counts.onsets.sum())
    rows = []
    for i, r in enumerate(counts.thresholds):
        alarms, caught, true = (int(counts.alarms[i].sum()), int(counts.caught[i].sum()),
                                int(counts.true_alarms[i].sum()))
        precision = true / alarms if alarms else None
        control_precision = float(true_s[i].mean()) / alarms if alarms else None
        rows.append({
            "threshold": float(r), "eligible": int(counts.eligible.sum()), "onsets": onsets,
            "alarms": alarms, "caught": caught, "true_alarms": true,
            "recall": caught / onsets if onsets else None, "precision": precision,
            "control_recall": float(caught_s[i].mean()) / onsets if onsets else None,
            "control_precision": control_precision,
            "lift": precision / control_precision if precision is not None and control_precision else None,
            "p_value": (1 + int((caught_s[i] >= caught).sum())) / (1 + n_shuffles) if onsets else None,
        })
    return pl.DataFrame(rows, schema={
        "threshold": pl.Float64, "eligible": pl.Int64, "onsets": pl.Int64, "alarms": pl.Int64,
        "caught": pl.Int64, "true_alarms": pl.Int64, "recall": pl.Float64,
        "precision": pl.Float64, "control_recall": pl.Float64, "control_precision": pl.Float64,
        "lift": pl.Float64, "p_value": pl.Float64})


@dataclass(frozen=True)
class SpikeAnalysis:
    """The loss-spike analyses of a study (None from `spike_analysis` when it has no loss spikes
    or no update RMS recorded)."""

    events: int  # loss-spike onsets in trials that recorded the update RMS: the ETA's events
    trials: int  # trials with the update RMS recorded
    eta: pl.DataFrame  # event_triggered_average of RMS_COLUMNS
    prediction: pl.DataFrame  # spike_prediction over THRESHOLDS
    lookback: int
    window: int
    n_shuffles: int
    # The largest rms_max over the lookback: before each eligible onset (mean, t-interval over
    # onsets) and, for comparison, before an average eligible step.
    before_onsets: tuple[float, float | None, float | None]
    before_any_step: float


def spike_analysis(steps: pl.LazyFrame, ran: pl.DataFrame, lookback: int = LOOKBACK,
                   window: int = WINDOW, thresholds: tuple[float, ...] = THRESHOLDS,
                   n_shuffles: int = N_SHUFFLES, level: float = LEVEL, seed: int = 0) -> SpikeAnalysis | None:
    """Every loss-spike analysis over the trials `ran` (done or diverged) and their `steps`, or
    None when none of them had a loss spike or none recorded the update RMS (nothing to relate).

    One pass over the steps (a single `collect_all`, so polars reads and windows them once): the
    eligible rows come back as three columns, which numpy counts; the event-triggered rows are
    joined on the integer block number, not the trial id.
    """
    if "loss_spike_count" not in ran.columns or not (ran["loss_spike_count"].fill_null(0) > 0).any():
        return None
    present = [c for c in RMS_COLUMNS if c in steps.collect_schema().names()]
    if "rms_max" not in present:
        return None
    # Speculatively in store order (as scan_steps reads a run directory), checked in the same
    # pass; rows in any other order are sorted and windowed by step number instead.
    for ordered in (True, False):
        flagged = _flagged_steps(steps, present, ordered)
        rows = _eligible(flagged, lookback, "rms_max", ordered)
        events = flagged.filter(pl.col("_onset")).select("_trial", "step")
        frame, names, onsets, triggered, check = pl.collect_all([
            rows.select("_trial", "_onset", "_before"), _names(rows), events,
            _triggered_rows(flagged, events, present, window, "_trial", near_onsets=True),
            _order_check(steps)])
        if not ordered or _in_order(check):
            break
    counts = count_predictions(dict(names.iter_rows()), frame["_trial"].to_numpy(),
                               frame["_onset"].to_numpy(), frame["_before"].to_numpy(), thresholds)
    if not counts.onsets.sum():
        return None
    # Events and their averages only in trials that recorded the RMS (those with eligible steps).
    recorded = names["_trial"].to_list()
    onset = frame["_onset"].to_numpy()
    before = frame["_before"].to_numpy()
    return SpikeAnalysis(
        events=onsets.filter(pl.col("_trial").is_in(recorded)).height, trials=counts.eligible.size,
        eta=group_t_stats(triggered.filter(pl.col("_trial").is_in(recorded)), ["offset"], present,
                          level).sort("offset"),
        prediction=spike_prediction(counts, n_shuffles, seed), lookback=lookback, window=window,
        n_shuffles=n_shuffles, before_onsets=t_interval(before[onset], level),
        before_any_step=float(np.nanmean(before)))


@dataclass(frozen=True)
class Knobs:
    """`levels`: per knob value and metric, the mean with its interval (t over trials for
    continuous metrics, Wilson for the fraction diverged). `effects`: each non-reference value
    minus the reference value, paired where trials pair, with Holm-adjusted p-values per metric."""

    levels: pl.DataFrame
    effects: pl.DataFrame


def _reference(knob: str, values: list) -> object:
    """The value others are compared with: softmax for the loss (sigmoid − softmax, as SigLIP
    reports it), else the smallest (β2 0.95, the lowest LR, adamw before stable_adamw)."""
    if knob == "loss.kind" and "softmax" in values:
        return "softmax"
    return min(values)


def _level_rows(frame: pl.DataFrame, knob: str, value: object, metric: str, kind: str,
                level: float) -> dict:
    x = frame[metric].cast(pl.Float64).drop_nulls().drop_nans().to_numpy()
    if kind == "binary":
        k, n = int(x.sum()), int(x.size)
        low, high = wilson(k, n, level)
        return {"knob": knob, "value": str(value), "metric": metric, "n": n,
                "mean": k / n if n else None, "ci_low": low, "ci_high": high, "method": "Wilson"}
    mean, low, high = t_interval(x, level)
    return {"knob": knob, "value": str(value), "metric": metric, "n": int(x.size),
            "mean": None if math.isnan(mean) else mean, "ci_low": low, "ci_high": high,
            "method": "t"}


def knob_effects(ran: pl.DataFrame, axes: list[str], knobs: tuple[str, ...] = KNOBS,
                 level: float = LEVEL) -> Knobs:
    """The effect of each swept knob that varies among the trials `ran` (done or diverged).

    Pairs: a trial with the knob at value v and one at the reference value with the same value of
    every other swept axis (seed included) see the same data and init; their difference is one
    pair. Continuous metrics: paired t-test over pairs (Welch's t over all trials when none pair);
    the fraction diverged: exact McNemar over pairs (Fisher's exact test when none pair), with
    Wilson intervals on each side. p-values are Holm-adjusted over all comparisons of one metric.
    """
    frame = ran.with_columns((pl.col("status") == Status.DIVERGED).cast(pl.Float64).alias("diverged"))
    levels: list[dict] = []
    effects: list[dict] = []
    for knob in knobs:
        if knob not in axes or knob not in frame.columns or frame[knob].n_unique() < 2:
            continue
        values = frame[knob].unique().to_list()
        reference = _reference(knob, values)
        others = [a for a in axes if a != knob and a in frame.columns]
        ordered = [reference] + sorted(v for v in values if v != reference)
        for metric, kind in KNOB_METRICS:
            if metric not in frame.columns:
                continue
            for value in ordered:
                levels.append(_level_rows(frame.filter(pl.col(knob) == value), knob, value, metric,
                                          kind, level))
            for value in ordered[1:]:
                effects.append(_effect(frame, knob, value, reference, others, metric, kind, level))
    for metric, _ in KNOB_METRICS:
        family = [row for row in effects if row["metric"] == metric]
        for row, adjusted in zip(family, holm([row["p"] for row in family])):
            row["p_holm"] = adjusted
    return Knobs(
        levels=pl.DataFrame(levels, schema={
            "knob": pl.String, "value": pl.String, "metric": pl.String, "n": pl.Int64,
            "mean": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "method": pl.String}),
        effects=pl.DataFrame(effects, schema=EFFECT_SCHEMA))


EFFECT_SCHEMA = {
    "knob": pl.String, "value": pl.String, "reference": pl.String, "metric": pl.String,
    "paired": pl.Boolean, "n": pl.Int64, "mean_value": pl.Float64, "mean_reference": pl.Float64,
    "diff": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "p": pl.Float64,
    "count_value": pl.Int64, "count_reference": pl.Int64, "method": pl.String,
    "p_holm": pl.Float64,
}


def _effect(frame: pl.DataFrame, knob: str, value: object, reference: object, others: list[str],
            metric: str, kind: str, level: float) -> dict:
    """One comparison value − reference of one metric, pooled over the other settings (a row of
    EFFECT_SCHEMA without p_holm)."""
    head = {"knob": knob, "value": str(value), "reference": str(reference), "metric": metric}
    if kind != "binary":
        row = compare_one(frame, knob, value, reference, metric, others, level)
        return {**head, "paired": row["paired"], "n": row["n"], "mean_value": row["mean_first"],
                "mean_reference": row["mean_second"], "diff": row["diff"], "ci_low": row["ci_low"],
                "ci_high": row["ci_high"], "p": row["p"], "count_value": None,
                "count_reference": None, "method": row["method"]}
    sides = {v: frame.filter(pl.col(knob) == v).select(others + [metric]) for v in (value, reference)}
    pairs = (sides[value].join(sides[reference], on=others, suffix="_ref", nulls_equal=True)
             if others else pl.DataFrame())
    if pairs.height:
        a, b = pairs[metric].to_numpy(), pairs[f"{metric}_ref"].to_numpy()
        p = mcnemar_exact(int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum()))
        method = "exact McNemar"
    else:
        a, b = sides[value][metric].to_numpy(), sides[reference][metric].to_numpy()
        p = fisher_exact(int(a.sum()), int(a.size), int(b.sum()), int(b.size))
        method = "Fisher exact"
    mean_a = float(a.mean()) if a.size else None
    mean_b = float(b.mean()) if b.size else None
    return {**head, "paired": bool(pairs.height), "n": int(pairs.height or min(a.size, b.size)),
            "mean_value": mean_a, "mean_reference": mean_b,
            "diff": mean_a - mean_b if mean_a is not None and mean_b is not None else None,
            "ci_low": None, "ci_high": None, "p": p, "count_value": int(a.sum()),
            "count_reference": int(b.sum()), "method": method}

"""The report's generated findings: short sentences with numbers, intervals and tests.

Every claim states its direction and its confidence, and says "inconclusive" where the data do not
support one:
- the loss comparison is sigmoid − softmax per group of the other axes (each batch size), paired
  by seed, with a paired t-interval and a Holm-adjusted p-value over the groups (`compare`);
- settings are ranked by their mean over seeds with Student-t intervals (`stats`);
- the fits say where a curve saturates, or why no fit is given (`fits`);
- instability: spike rates, divergence, stalled trials, whether the update RMS predicts loss
  spikes (against shuffled spike times) and the effect of each swept knob (`instability`).
"""

from __future__ import annotations

import math

import polars as pl

from scalestudy.analysis.aggregate import LOSS_AXIS, Aggregates, curve_trials
from scalestudy.analysis.compare import compare
from scalestudy.analysis.fits import FitFailure, FitSummary
from scalestudy.analysis.instability import SpikeAnalysis
from scalestudy.analysis.labels import axis_name, line_label, percent
from scalestudy.analysis.stats import LEVEL, holm
from scalestudy.store import RESULTS, Status

ALPHA = 1 - LEVEL  # a finding is claimed when its (adjusted) p-value is below this
# How close to the no-learning loss a stalled trial's final loss is (train.summary.STALL_TOLERANCE,
# which sets the per-trial `stalled` flag; the analysis reads the flag, not the training code).
STALL_TEXT = "within 2 % of the no-learning loss"


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
            f"enter no curve; {rule}. Intervals are {LEVEL:.0%} Student-t intervals of the mean "
            "over seeds (none with one seed).")
    if agg.other_trials:
        line += (f" {agg.other_trials} more trial(s) in this directory are not in the study as "
                 "last run (an earlier sweep, or a scalestudy version whose configs hash to other "
                 "trial ids) and are left out; results.parquet has them (in_study = false).")
    return line


def signed(value: float, scale: float = 100.0, unit: str = " pp", digits: int = 1) -> str:
    """+1.5 pp / −0.3 pp (a real minus sign)."""
    return f"{scale * value:+.{digits}f}".replace("-", "−") + unit


def p_text(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"= {p:.3f}" if p < 0.1 else f"= {p:.2f}"


def interval(low: float | None, high: float | None, scale: float = 100.0, unit: str = " pp",
             digits: int = 1) -> str:
    if low is None or high is None:
        return "no interval"
    return f"[{signed(low, scale, '', digits)}, {signed(high, scale, '', digits)}]{unit}"


def verdict(row: dict, first: str, second: str, family: int, higher: str = "ahead") -> str:
    """Direction and confidence of one comparison (first − second), Holm-adjusted over `family`."""
    if row["ci_low"] is None or row["p"] is None:
        return "inconclusive: fewer than two pairs, no interval"
    winner = first if row["diff"] > 0 else second
    if row["p_holm"] is not None and row["p_holm"] < ALPHA and (row["ci_low"] > 0 or row["ci_high"] < 0):
        return f"{winner} {higher}"
    if row["ci_low"] > 0 or row["ci_high"] < 0:
        return (f"inconclusive after correcting for {family} comparisons (unadjusted "
                f"p {p_text(row['p'])})")
    return "inconclusive: the interval contains 0"


def loss_comparisons(agg: Aggregates, metric: str = "zeroshot_top1") -> pl.DataFrame:
    """sigmoid − softmax of `metric` per group of the other axes, paired by seed, Holm-adjusted
    over the groups (`compare.compare`). Empty unless the study compares exactly two losses."""
    lay = agg.layout
    used = curve_trials(agg.trials, agg.include_diverged)
    if LOSS_AXIS not in lay.hue or used[LOSS_AXIS].n_unique() != 2 or metric not in used.columns:
        return pl.DataFrame()
    # The proposed loss first (sigmoid − softmax, as SigLIP reports it), else alphabetical.
    first, second = sorted(used[LOSS_AXIS].unique().to_list(), key=lambda k: (k != "sigmoid", k))
    others = [a for a in lay.by if a != LOSS_AXIS]
    return compare(used, LOSS_AXIS, first, second, metric, others,
                   [lay.seed] if lay.seed else [])


def comparison_lines(agg: Aggregates, metric: str = "zeroshot_top1") -> list[str]:
    diffs = loss_comparisons(agg, metric)
    if diffs.is_empty():
        return []
    others = [a for a in agg.layout.by if a != LOSS_AXIS]
    first, second = diffs["first"][0], diffs["second"][0]
    family = diffs.filter(pl.col("p").is_not_null()).height
    lines = []
    for row in diffs.iter_rows(named=True):
        where = line_label(row, others) if others else "overall"
        pairs = (f"{row['n']} seed pairs" if row["paired"]
                 else f"unpaired, {row['n_first']} vs {row['n_second']} seeds, Welch t")
        lines.append(
            f"{where}: {first} − {second} = {signed(row['diff'])} ({LEVEL:.0%} t-CI "
            f"{interval(row['ci_low'], row['ci_high'])}, Holm-adjusted p {p_text(row['p_holm'])}; "
            f"{pairs}): {verdict(row, first, second, family)}")
    scope = (f"Holm-adjusted over the {family} {'groups' if len(others) != 1 else axis_name(others[0]) + ' values'}"
             if family > 1 else "one comparison, no adjustment needed")
    return [f"Zero-shot top-1, {first} against {second}, compared in pairs of the same seed (same "
            f"data order and init); paired t-intervals, {scope}:"] + ["  " + line for line in lines]


def ranking_lines(agg: Aggregates, metric: str = "zeroshot_top1") -> list[str]:
    stats = agg.curves.get(metric)
    if stats is None or stats.is_empty():
        return ["No trial has a zero-shot result yet."]
    ordered = stats.sort("mean", descending=True)
    keys = agg.layout.by

    def describe(row: dict) -> str:
        spread = (f"{LEVEL:.0%} t-CI {percent(row['ci_low'])}–{percent(row['ci_high'])}"
                  if row["ci_low"] is not None else "one seed, no interval")
        return f"{line_label(row, keys)}: {percent(row['mean'])} ({spread}, n={row['n']})"

    lines = [f"Highest zero-shot top-1: {describe(ordered.row(0, named=True))}."]
    if ordered.height > 1:
        lines.append(f"Lowest: {describe(ordered.row(-1, named=True))}.")
    return lines


def fit_lines(fits: list[FitSummary | FitFailure]) -> list[str]:
    if not fits:
        return []
    return ["\n".join(["Saturating power-law fits of zero-shot top-1 against batch size "
                       "(bands: bootstrap over seeds):"] + ["  " + f.describe() for f in fits])]


def instability_lines(agg: Aggregates) -> list[str]:
    frame = agg.instability.filter(pl.col("spike_rate_per_1k").is_not_null())
    if frame.is_empty():
        return []
    keys = agg.layout.by
    lines = []
    for rate, ratio, name in (("spike_rate_per_1k", "max_spike_ratio", "grad-norm spikes"),
                              ("loss_spike_rate_per_1k", "max_loss_spike_ratio", "loss spikes")):
        rated = frame.filter(pl.col(rate).is_not_null())
        if rated.is_empty():
            continue
        worst = rated.sort(rate, descending=True).row(0, named=True)
        if not worst[rate]:
            lines.append(f"No {name} in any trial.")
            continue
        # No ratio when no step was flagged (or the trials were shorter than the monitor's window).
        worst_ratio = worst[ratio]
        lines.append(f"Most {name}: {line_label(worst, keys)} with {worst[rate]:.1f} per 1,000 "
                     "steps (mean over seeds)"
                     + (f"; worst {worst_ratio:.1f}× the running median." if worst_ratio else "."))
    diverged = frame.filter(pl.col("fraction_diverged") > 0)
    if diverged.height:
        shown = "; ".join(f"{line_label(r, keys)}: {r['fraction_diverged']:.0%} of {r['n']}"
                          for r in diverged.iter_rows(named=True))
        lines.append(f"Seeds diverged in {diverged.height} setting(s): {shown}.")
    else:
        lines.append("No seed diverged.")
    return lines


def stalled_lines(agg: Aggregates) -> list[str]:
    """Which settings stalled: final loss at the loss of a model that learned nothing."""
    extras = agg.extras
    if extras.is_empty() or "stalled" not in extras.columns:
        return []
    total = int(agg.trials.filter(pl.col("status").is_in(RESULTS))["stalled"].is_not_null().sum())
    stalled = extras.filter(pl.col("stalled") > 0)
    if not total:
        return []
    if stalled.is_empty():
        return [f"No trial stalled (final loss at the no-learning level) among {total} with a final loss."]
    counts = agg.counts.select(agg.layout.by + ["done", "diverged"])
    shown = "; ".join(
        f"{line_label(r, agg.layout.by)}: {r['stalled']} of {r['done'] + r['diverged']} "
        f"(no-learning loss {r['no_learning_loss']:.2f})"
        for r in stalled.join(counts, on=agg.layout.by, nulls_equal=True).iter_rows(named=True))
    return [f"Stalled — final loss {STALL_TEXT}, i.e. nothing learned about which caption goes "
            f"with which image — in {stalled.height} setting(s): {shown}."]


def spike_lines(spikes: SpikeAnalysis | None) -> list[str]:
    """Whether the update RMS rises before loss spikes and predicts them (Wortsman et al. 2023)."""
    if spikes is None:
        return []
    mean, low, high = spikes.before_onsets
    ci = (f"{LEVEL:.0%} t-CI {low:.2f}–{high:.2f}" if low is not None else "no interval")
    lines = [f"Loss spikes and the update RMS (Wortsman et al. 2023 §3.4): {spikes.events} loss-spike "
             f"onsets in {spikes.trials} trials with the RMS recorded. The largest rms_max in the "
             f"{spikes.lookback} steps before an onset averaged {mean:.2f} ({ci}, over onsets), "
             f"against {spikes.before_any_step:.2f} before an average step."]
    prediction = spikes.prediction
    adjusted = holm(prediction["p_value"].to_list())
    parts, predictive, floor = [], [], []
    for row, p_adj in zip(prediction.iter_rows(named=True), adjusted):
        if row["alarms"] == 0:
            parts.append(f"r = {row['threshold']:g}: rms_max never exceeded it (recall 0)")
            continue
        lift = f"{row['lift']:.1f}×" if row["lift"] is not None else "n/a"
        if row["p_value"] <= 1 / (1 + spikes.n_shuffles):
            floor.append(f"{row['threshold']:g}")
        parts.append(
            f"r = {row['threshold']:g}: recall {percent(row['recall'], 0)} (shuffled "
            f"{percent(row['control_recall'], 0)}), precision {percent(row['precision'], 0)} "
            f"(shuffled {percent(row['control_precision'], 0)}, lift {lift}), "
            f"permutation p {p_text(p_adj)}")
        if p_adj is not None and p_adj < ALPHA:
            predictive.append(f"{row['threshold']:g}")
    conclusion = (f"rms_max above r = {', '.join(predictive)} predicts loss spikes better than "
                  f"shuffled spike times (Holm-adjusted over the {prediction.height} thresholds)"
                  if predictive else
                  "at no threshold does rms_max predict loss spikes better than shuffled spike "
                  "times: inconclusive")
    if floor:
        conclusion += (f"; at r = {', '.join(floor)} no shuffle caught as many onsets, so p is "
                       f"the smallest {spikes.n_shuffles} shuffles can show (1/{spikes.n_shuffles + 1}, "
                       f"times Holm's factor)")
    lines.append(
        f"Predictor \"rms_max > r at any of the {spikes.lookback} steps before\", against "
        f"{spikes.n_shuffles} within-trial shuffles of the spike times: " + "; ".join(parts)
        + f". So {conclusion}.")
    return lines


KNOB_LABELS = {"loss_spike_rate_per_1k": "loss spikes per 1,000 steps", "zeroshot_top1": "zero-shot top-1",
               "collapse_fraction": "share of steps at the no-learning loss"}
# How a clear difference reads, per metric: (value − reference > 0, < 0).
KNOB_WORDS = {"loss_spike_rate_per_1k": ("more loss spikes", "fewer loss spikes"),
              "diverged": ("diverges more often", "diverges less often"),
              "collapse_fraction": ("collapses more", "collapses less"),
              "zeroshot_top1": ("more accurate", "less accurate")}


def knob_part(row: dict) -> str:
    """One knob comparison of one metric: the difference, its interval and test, and a verdict."""
    metric = row["metric"]
    more, less = KNOB_WORDS.get(metric, ("higher", "lower"))
    sure = row["p_holm"] is not None and row["p_holm"] < ALPHA and bool(row["diff"])
    word = (more if row["diff"] > 0 else less) if sure else "inconclusive"
    if metric == "diverged":
        if not row["count_value"] and not row["count_reference"]:
            return f"diverged: none of {row['n']} {'pairs' if row['paired'] else 'trials'}"
        members = "pairs" if row["paired"] else "trials each"
        return (f"diverged {row['count_value']} vs {row['count_reference']} of {row['n']} {members} "
                f"({row['method']} p {p_text(row['p'])}, Holm {p_text(row['p_holm'])}): {word}")
    scale, unit, digits = ((100.0, " pp", 1) if metric in ("zeroshot_top1", "collapse_fraction")
                           else (1.0, "", 2))
    how = f"paired over {row['n']}" if row["paired"] else "unpaired, Welch t"
    clear = row["ci_low"] is not None and (row["ci_low"] > 0 or row["ci_high"] < 0)
    if not (sure and clear):
        word = ("inconclusive after Holm's correction" if clear else
                "inconclusive: no interval" if row["ci_low"] is None else "inconclusive")
    return (f"{KNOB_LABELS.get(metric, metric)} {signed(row['diff'], scale, unit, digits)} "
            f"({LEVEL:.0%} t-CI {interval(row['ci_low'], row['ci_high'], scale, unit, digits)}, "
            f"{how}, Holm p {p_text(row['p_holm'])}): {word}")


def knob_lines(agg: Aggregates) -> list[str]:
    """Each swept instability knob: its effect on loss spikes, divergence and accuracy."""
    effects = agg.knobs.effects.filter(pl.col("diff").is_not_null())
    if effects.is_empty():
        return []
    lines = []
    for (knob, value, reference), rows in effects.group_by(["knob", "value", "reference"],
                                                          maintain_order=True):
        name = axis_name(knob)
        lines.append(f"{name} = {value} against {name} = {reference}: "
                     + "; ".join(knob_part(row) for row in rows.iter_rows(named=True)) + ".")
    return ["\n".join(["Instability knobs, each value against the reference over all other "
                       "settings, paired by seed and setting (p-values Holm-adjusted over every "
                       "comparison of the same figure):"] + ["  " + line for line in lines])]


def findings(agg: Aggregates, fits: list[FitSummary | FitFailure]) -> list[str]:
    """The summary, one finding per item (items may have indented sub-lines)."""
    items = [counts_line(agg)]
    items += ranking_lines(agg)
    comparison = comparison_lines(agg)
    if comparison:
        items.append("\n".join(comparison))
    items += fit_lines(fits)
    items += instability_lines(agg)
    items += stalled_lines(agg)
    items += spike_lines(agg.spikes)
    items += knob_lines(agg)
    return items

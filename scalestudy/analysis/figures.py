"""The report's figures, drawn with matplotlib from the aggregates (never from the raw store).

Every figure is saved as PNG (for the page) and SVG (for a paper), with labelled axes and units,
a log2 batch-size axis where batch size is swept, and a legend naming each line and its seeds.
A study that does not sweep batch size gets the same figures over its settings instead. Every
band and error bar over seeds is a Student-t interval of the mean (`CI_METHOD`, said in each
title); a setting with one seed has none.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none is there on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from scalestudy.analysis.aggregate import CI_METHOD, Aggregates, Layout  # noqa: E402
from scalestudy.analysis.fits import FitFailure, FitSummary  # noqa: E402
from scalestudy.analysis.labels import BIAS_AXES, axis_name, group_labels, line_label  # noqa: E402

BATCH_LABEL = "batch size B (image–text pairs per step, log2 axis)"
EXAMPLES_LABEL = "examples seen (pairs)"
METRIC_LABELS = {
    "zeroshot_top1": "zero-shot top-1 accuracy (%)",
    "retrieval_i2t_r1": "image→text recall@1 (%)",
    "retrieval_t2i_r1": "text→image recall@1 (%)",
    "final_loss": "final training loss (nats, mean of last 10 steps)",
    "linear_probe_top1": "linear-probe top-1 accuracy (%)",
}
PERCENT_METRICS = {"zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1", "linear_probe_top1"}
# Small multiples: more columns than this stop being readable; the rest are left out (and said so).
MAX_FACETS = 6
MAX_LEGEND_LINES = 14


def legend_above(fig: Figure, handles: list[Any], labels: list[str], ncol: int, title: str) -> None:
    """The figure's legend in a band above its panels and the title above that, so neither covers
    a panel's title (`save` crops to everything drawn, y > 1 included)."""
    shown = min(len(handles), MAX_LEGEND_LINES)
    top = 1.0
    if shown:
        fig.legend(handles[:shown], labels[:shown], loc="lower center", ncol=min(shown, ncol),
                   fontsize=8, bbox_to_anchor=(0.5, 1.0))
        # The legend's rows (~0.2 in each, plus padding) in figure coordinates.
        top += (math.ceil(shown / ncol) * 0.2 + 0.1) / fig.get_size_inches()[1]
    fig.suptitle(title, fontsize=11, y=top, va="bottom")


def save(fig: Figure, out: Path, name: str) -> list[Path]:
    """Write `name`.png and `name`.svg under `out`; return both paths."""
    fig.tight_layout()
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    # A tight bounding box keeps titles and legends placed above the panels (y > 1) in the file.
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    # Text stays text in the SVG (editable and searchable in a paper), not glyph outlines.
    with plt.rc_context({"svg.fonttype": "none"}):
        fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def values(series: pl.Series, scale: float = 1.0) -> np.ndarray:
    """A column as floats for matplotlib: null (no interval, no value) becomes NaN, not drawn."""
    return series.cast(pl.Float64).fill_null(float("nan")).to_numpy() * scale


def _legend(ax: Axes) -> None:
    """A legend when the panel has labelled lines (a study with no results yet has none)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _batch_axis(ax: Axes, sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{b:,}" for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel(BATCH_LABEL)


def _scale(metric: str) -> float:
    return 100.0 if metric in PERCENT_METRICS else 1.0


def _lines(frame: pl.DataFrame, hue: list[str]) -> list[tuple[str, pl.DataFrame]]:
    labels = group_labels(frame, hue)
    if not hue:
        return [(labels[()], frame)]
    return [(labels[tuple(key)], group) for key, group in frame.group_by(hue, maintain_order=True)]


def _left_out(counts: pl.DataFrame, hue: list[str], include_diverged: bool) -> dict[str, str]:
    """Per line label: what its points leave out ("2 failed, 1 diverged excluded")."""
    notes: dict[str, str] = {}
    for label, group in _lines(counts, hue):
        failed, diverged = int(group["failed"].sum()), int(group["diverged"].sum())
        unfinished = int(group["unfinished"].sum())
        parts = [f"{failed} failed"] if failed else []
        if diverged:
            parts.append(f"{diverged} diverged " + ("incl." if include_diverged else "excluded"))
        if unfinished:
            parts.append(f"{unfinished} unfinished")
        notes[label] = ", ".join(parts)
    return notes


def _legend_label(label: str, group: pl.DataFrame, notes: dict[str, str]) -> str:
    seeds = int(group["n"].max()) if group.height else 0
    note = notes.get(label, "")
    return f"{label} (n={seeds}" + (f"; {note})" if note else ")")


def _curve_panel(ax: Axes, agg: Aggregates, metric: str, fits: list[FitSummary | FitFailure]) -> None:
    """One metric: mean over seeds per line with its CI band, against batch size or by setting."""
    lay, scale = agg.layout, _scale(metric)
    curves = agg.curves[metric]
    notes = _left_out(agg.counts, lay.hue, agg.include_diverged)
    if lay.x is None:
        _setting_points(ax, curves, lay.hue, scale, notes)
    else:
        fitted = {f.label: f for f in fits if isinstance(f, FitSummary)}
        for label, group in _lines(curves, lay.hue):
            group = group.sort(lay.x)
            xs = group[lay.x].to_numpy()
            line, = ax.plot(xs, values(group["mean"], scale), marker="o",
                            label=_legend_label(label, group, notes))
            ax.fill_between(xs, values(group["ci_low"], scale), values(group["ci_high"], scale),
                            color=line.get_color(), alpha=0.2, linewidth=0)
            if label in fitted:
                fit = fitted[label]
                ax.plot(fit.grid, fit.fit(fit.grid) * scale, linestyle="--", linewidth=1,
                        color=line.get_color())
                ax.fill_between(fit.grid, fit.band_low * scale, fit.band_high * scale,
                                color=line.get_color(), alpha=0.08, linewidth=0)
        _batch_axis(ax, sorted(agg.trials[lay.x].unique().to_list()))
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(alpha=0.3)


def _setting_points(ax: Axes, stats: pl.DataFrame, hue: list[str], scale: float,
                    notes: dict[str, str]) -> None:
    """No batch-size axis: one point per setting with its CI as an error bar."""
    lines = _lines(stats, hue)
    for i, (label, group) in enumerate(lines):
        mean = float(values(group["mean"], scale)[0])
        low, high = values(group["ci_low"], scale)[0], values(group["ci_high"], scale)[0]
        if np.isnan(low):  # one seed: the point alone
            ax.plot([i], [mean], "o", color="C0")
        else:
            ax.errorbar([i], [mean], yerr=[[mean - low], [high - mean]], fmt="o", capsize=4, color="C0")
    _setting_ticks(ax, [_legend_label(label, group, notes) for label, group in lines])
    ax.set_xlabel(", ".join(axis_name(h) for h in hue) or "setting")


def _setting_ticks(ax: Axes, labels: list[str]) -> None:
    """One tick per setting, its label wrapped under it: the ticks name the points, no legend."""
    # Wrap to the room each tick has: ~5 pt per character at 8 pt type.
    room = ax.figure.get_figwidth() * ax.get_position().width * 72 / max(1, len(labels))
    width = max(6, int(room / 5.2))
    ax.set_xticks(range(len(labels)), [textwrap.fill(label, width) for label in labels], fontsize=8)
    if labels:  # no setting has a value (every metric missing): an empty axis, not a 0-wide one
        ax.set_xlim(-0.5, len(labels) - 0.5)


def _chance(ax: Axes, trials: pl.DataFrame, metric: str) -> None:
    chance = trials["zeroshot_chance"].drop_nulls()
    if metric == "zeroshot_top1" and chance.len():
        ax.axhline(100 * chance[0], color="grey", linestyle=":", label="chance")


def plot_accuracy(agg: Aggregates, fits: list[FitSummary | FitFailure], out: Path) -> list[Path]:
    """Zero-shot top-1 against batch size (SigLIP Fig. 2): mean ± bootstrap CI, fits dashed."""
    # Settings side by side (no batch axis) get room for their wrapped names.
    fig, ax = plt.subplots(figsize=(7 if agg.layout.x is not None else 9.5, 4.5))
    _curve_panel(ax, agg, "zeroshot_top1", fits)
    _chance(ax, agg.trials, "zeroshot_top1")
    seeds = "seeds" if agg.layout.seed else "trials"
    spread = "band" if agg.layout.x is not None else "bar"
    ax.set_title(f"Zero-shot accuracy: mean over {seeds}, {spread} = {CI_METHOD}"
                 + (",\ndashed = power-law fit (its band: bootstrap)"
                    if any(isinstance(f, FitSummary) for f in fits) else ""),
                 fontsize=10)
    _legend(ax)
    return save(fig, out, "accuracy_vs_batch")


def plot_retrieval(agg: Aggregates, out: Path) -> list[Path]:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    for ax, metric in zip(axes[0], ("retrieval_i2t_r1", "retrieval_t2i_r1")):
        _curve_panel(ax, agg, metric, [])
        ax.set_title(METRIC_LABELS[metric].replace(" (%)", "") + f" ({CI_METHOD})", fontsize=10)
        _legend(ax)
    return save(fig, out, "retrieval_vs_batch")


INSTABILITY = (
    ("spike_rate_per_1k", "grad-norm spikes per 1,000 steps (mean over seeds)"),
    ("loss_spike_rate_per_1k", "loss spikes per 1,000 steps (mean over seeds)"),
    ("max_spike_ratio", "largest spike: grad norm / running median (max over seeds)"),
    ("fraction_diverged", "fraction of seeds diverged"),
)


def plot_instability(agg: Aggregates, out: Path) -> list[Path]:
    """Why large batches degrade: spike rate, worst spike and divergence per line (loss, β2, …)."""
    lay = agg.layout
    fig, axes = plt.subplots(1, len(INSTABILITY), figsize=(5.2 * len(INSTABILITY), 4.5), squeeze=False)
    for ax, (column, ylabel) in zip(axes[0], INSTABILITY):
        frame = agg.instability
        lines = _lines(frame, lay.hue)
        for i, (label, group) in enumerate(lines):
            if lay.x is None:
                ax.plot([i], group[column].to_list()[:1], marker="o", linestyle="")
            else:
                group = group.sort(lay.x)
                ax.plot(group[lay.x], group[column], marker="o", label=f"{label} (n={group['n'].max()})")
        if lay.x is None:
            _setting_ticks(ax, [label for label, _ in lines])
        else:
            _batch_axis(ax, sorted(agg.trials[lay.x].unique().to_list()))
        if column == "max_spike_ratio" and (frame[column].fill_nan(None).drop_nulls() > 0).any():
            # A ratio: log scale, once some trial has one (too short a trial to fill the
            # monitor's window has none, and a log axis over nothing cannot be drawn).
            ax.set_yscale("log")
        if column == "fraction_diverged":
            ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    _legend(axes[0][0])
    fig.suptitle("Instability (every trial that trained, diverged ones included)", fontsize=11)
    return save(fig, out, "instability")


def init_axes(lay: Layout) -> tuple[list[str], list[str]]:
    """The heatmap's row axes (the bias setting) and column axes (the temperature init)."""
    rows = [a for a in lay.hue if a in BIAS_AXES]
    cols = [a for a in lay.hue if a == "loss.temperature_init"]
    return rows, cols


def plot_init_heatmap(agg: Aggregates, out: Path) -> list[Path]:
    """Final zero-shot accuracy over the bias × temperature init grid, one panel per other setting."""
    lay = agg.layout
    rows, cols = init_axes(lay)
    rest = [a for a in lay.by if a not in rows + cols]
    stats = agg.curves["zeroshot_top1"]
    panels = _lines(stats, rest)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 2.2 * len(panels), 4.5), squeeze=False)
    row_labels = group_labels(stats.sort(rows, nulls_last=True), rows)
    col_labels = group_labels(stats.sort(cols, nulls_last=True), cols)
    for ax, (title, group) in zip(axes[0], panels):
        grid = np.full((len(row_labels), len(col_labels)), np.nan)
        text = [["" for _ in col_labels] for _ in row_labels]
        for r in group.iter_rows(named=True):
            i = list(row_labels).index(tuple(r[a] for a in rows))
            j = list(col_labels).index(tuple(r[a] for a in cols))
            grid[i, j] = 100 * r["mean"]
            text[i][j] = (f"{100 * r['mean']:.1f}\n±{50 * (r['ci_high'] - r['ci_low']):.1f}"
                          if r["ci_low"] is not None else f"{100 * r['mean']:.1f}\n(n=1)")
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        for i, row in enumerate(text):
            for j, cell in enumerate(row):
                ax.text(j, i, cell, ha="center", va="center", fontsize=8, color="white")
        ax.set_yticks(range(len(row_labels)), list(row_labels.values()))
        ax.set_xticks(range(len(col_labels)), list(col_labels.values()))
        ax.set_xlabel("temperature init t₀ (logit scale)" if cols else "")
        ax.set_ylabel("sigmoid bias init b₀" if rows else "")
        ax.set_title(title if rest else "", fontsize=10)
        fig.colorbar(image, ax=ax, label="zero-shot top-1 (%)")
    fig.suptitle(f"Init sensitivity: final zero-shot top-1, mean ± half the {CI_METHOD}",
                 fontsize=11)
    return save(fig, out, "init_sensitivity")


def _trial_groups(agg: Aggregates, steps: pl.DataFrame) -> pl.DataFrame:
    keys = [k for k in agg.layout.by + ([agg.layout.seed] if agg.layout.seed else [])]
    return steps.join(agg.trials.select(["trial_id", "status", "no_learning_loss"] + keys),
                      on="trial_id")


# Both kinds of spike, marked alike in every figure: grad-norm spikes ×, loss spikes ▲.
GRAD_SPIKE = {"marker": "x", "color": "red", "s": 18, "zorder": 3}
LOSS_SPIKE = {"marker": "^", "color": "black", "s": 22, "zorder": 3}


def _no_learning(ax: Axes, level: float | None, colour: Any) -> None:
    """The loss of a model that learned nothing (train.summary.no_learning_loss), dashed."""
    if level is not None and np.isfinite(level):
        ax.axhline(level, color=colour, linestyle="--", linewidth=0.8, alpha=0.7)


def plot_early_loss(agg: Aggregates, out: Path) -> list[Path]:
    """Training loss over the first part of training, mean over seeds, one line per setting."""
    lay = agg.layout
    rest = [a for a in ([lay.x] if lay.x else []) if a]
    early = _trial_groups(agg, agg.early)
    mean = early.group_by(lay.hue + rest + ["bin"]).agg(
        pl.col("examples_seen").max(), pl.col("loss").mean()
    )
    panels = _lines(mean, rest)[:MAX_FACETS]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, panel) in zip(axes[0], panels):
        for label, group in _lines(panel, lay.hue):
            group = group.sort("bin")
            ax.plot(group["examples_seen"], group["loss"], label=label, linewidth=1.2)
        ax.set_xlabel(EXAMPLES_LABEL)
        ax.set_ylabel("training loss (nats, mean over seeds)")
        ax.set_title(title if rest else "", fontsize=10)
        ax.grid(alpha=0.3)
    _legend(axes[0][0])
    fig.suptitle("Early training loss per setting", fontsize=11)
    return save(fig, out, "early_loss")


TRACE_ROWS = (
    ("loss", "training loss (nats; ▲ loss spike,\n-- no-learning level)", False),
    ("grad_norm_max", "grad norm (pre-clip, max per bin; × = spike)", True),
    ("temperature", "logit scale t", True),
    ("bias", "sigmoid bias b", False),
    ("rms_max", "update RMS (max over matrices)", False),
)


def plot_traces(agg: Aggregates, out: Path) -> list[Path]:
    """Per-trial traces as small multiples: one column per value of the facet axis, one row per
    quantity; each trial one thin line, coloured by its setting (seeds share a colour)."""
    lay = agg.layout
    facet = [lay.x] if lay.x else []
    traces = _trial_groups(agg, agg.traces)
    rows = [r for r in TRACE_ROWS if r[0] in traces.columns and traces[r[0]].drop_nulls().len()]
    panels = _lines(traces.sort(facet) if facet else traces, facet)
    left_out = len(panels) - MAX_FACETS
    if left_out > 0:
        keep = np.linspace(0, len(panels) - 1, MAX_FACETS).round().astype(int)
        panels = [panels[i] for i in keep]
    colours = _colours(group_labels(traces, lay.hue))
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(3.4 * len(panels), 2.3 * len(rows)),
                             squeeze=False, sharex="col")
    for j, (title, panel) in enumerate(panels):
        trials = [(line_label(trial.row(0, named=True), lay.hue), trial.sort("bin"))
                  for _, trial in panel.group_by(["trial_id"], maintain_order=True)]
        for i, (column, ylabel, log) in enumerate(rows):
            ax = axes[i][j]
            for label, trial in trials:
                ax.plot(trial["examples_seen"], trial[column], color=colours[label], linewidth=0.8,
                        alpha=0.8, label=label)
                if column == "loss":
                    _no_learning(ax, trial["no_learning_loss"][0], colours[label])
            if column == "grad_norm_max":
                spikes = panel.filter(pl.col("spikes") > 0)
                ax.scatter(spikes["examples_seen"], spikes["grad_norm_max"], **GRAD_SPIKE)
            if column == "loss":
                spikes = panel.filter(pl.col("loss_spikes") > 0)
                ax.scatter(spikes["examples_seen"], spikes["loss_max"], **LOSS_SPIKE)
            if log:
                ax.set_yscale("log")
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=8)
        axes[0][j].set_title(title if facet else "all trials", fontsize=9)
        axes[-1][j].set_xlabel(EXAMPLES_LABEL, fontsize=8)
    handles = {}
    for ax in axes[0]:  # lines whose label starts with "_" (reference lines) have no legend entry
        handles.update({line.get_label(): line for line in ax.get_lines()
                        if not line.get_label().startswith("_")})
    note = f" ({left_out} of {left_out + MAX_FACETS} columns left out)" if left_out > 0 else ""
    legend_above(fig, list(handles.values()), list(handles), 5, f"Per-trial traces{note}")
    return save(fig, out, "traces")


def _colours(labels: dict[Any, str]) -> dict[str, Any]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(labels.values()))
    cmap = plt.get_cmap("tab20")
    return {name: (cycle[i] if len(names) <= len(cycle) else cmap(i % 20)) for i, name in enumerate(names)}


def plot_grad_norms(agg: Aggregates, out: Path) -> list[Path]:
    """Every trial's gradient norm (max per bin, log scale) with spikes marked, one panel per loss."""
    traces = _trial_groups(agg, agg.traces)
    if "loss.kind" not in traces.columns:
        traces = traces.join(agg.trials.select("trial_id", "loss.kind"), on="trial_id")
    kinds = sorted(traces["loss.kind"].unique().to_list()) or ["(no steps recorded)"]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(9, 3.2 * len(kinds)), squeeze=False)
    keys = [a for a in agg.layout.by + ([agg.layout.seed] if agg.layout.seed else [])
            if a != "loss.kind"]
    for ax, kind in zip(axes[:, 0], kinds):
        panel = traces.filter(pl.col("loss.kind") == kind)
        lines = 0
        for _, trial in panel.group_by(["trial_id"], maintain_order=True):
            trial = trial.sort("bin")
            ax.plot(trial["examples_seen"], trial["grad_norm_max"], linewidth=0.8,
                    label=line_label(trial.row(0, named=True), keys))
            lines += 1
        spikes = panel.filter(pl.col("spikes") > 0)
        ax.scatter(spikes["examples_seen"], spikes["grad_norm_max"], **GRAD_SPIKE)
        ax.set_yscale("log")
        ax.set_xlabel(EXAMPLES_LABEL)
        ax.set_ylabel("grad norm (pre-clip, max per bin)")
        ax.set_title(f"{kind}: gradient norm per trial, spikes marked ×", fontsize=10)
        if 0 < lines <= MAX_LEGEND_LINES:
            ax.legend(fontsize=7, ncol=2)
    return save(fig, out, "grad_norm")


def has_init_grid(lay: Layout) -> bool:
    rows, cols = init_axes(lay)
    return bool(rows or cols)


EVAL_X = {"examples_seen": (EXAMPLES_LABEL, "accuracy_vs_examples"),
          "step": ("optimizer steps", "accuracy_vs_steps")}


def eval_metric_label(metric: str) -> str:
    if metric.startswith("zeroshot_top1_"):
        return f"zero-shot top-1, {metric.removeprefix('zeroshot_top1_')} (%)"
    return METRIC_LABELS.get(metric, metric)


def plot_eval_curves(agg: Aggregates, out: Path, x: str = "examples_seen") -> list[Path]:
    """Accuracy during training (evals.parquet): one panel per metric (zero-shot top-1, each
    attribute's zero-shot top-1, linear probe), one line per setting, mean ± t-band over seeds,
    against examples seen or optimizer steps."""
    label, name = EVAL_X[x]
    evals = agg.evals
    metrics = list(dict.fromkeys(evals["metric"].to_list())) if evals.height else []
    cols = min(3, max(1, len(metrics)))
    rows = max(1, -(-len(metrics) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    by = agg.layout.by
    colours = _colours(group_labels(evals, by)) if evals.height else {}
    for ax, metric in zip(axes.flat, metrics):
        panel = evals.filter(pl.col("metric") == metric)
        for line_name, group in _lines(panel, by):
            group = group.sort(x)
            colour = colours[line_name]
            ax.plot(group[x], values(group["mean"], 100), color=colour, linewidth=1.2,
                    label=f"{line_name} (n={int(group['n'].max())})")
            ax.fill_between(group[x].to_numpy(), values(group["ci_low"], 100),
                            values(group["ci_high"], 100), color=colour, alpha=0.18, linewidth=0)
        if metric == "zeroshot_top1":
            _chance(ax, agg.trials, metric)
        ax.set_title(eval_metric_label(metric).replace(" (%)", ""), fontsize=10)
        ax.set_ylabel("accuracy (%)")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_axis_off()
    if not metrics:
        axes[0][0].text(0.5, 0.5, "no evaluations recorded", ha="center", va="center",
                        transform=axes[0][0].transAxes)
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend_above(fig, handles, labels, 4, f"Accuracy during training: mean over seeds, band = {CI_METHOD}")
    return save(fig, out, name)


SETTING_ROWS = (("loss", "training loss (nats)"), ("temperature", "logit scale t"),
                ("bias", "sigmoid bias b"))


def plot_setting_traces(agg: Aggregates, out: Path) -> list[Path]:
    """Loss, temperature and bias over training per setting (mean ± t-band over seeds), with each
    setting's no-learning loss dashed in the loss panel: a loss that stays on it learned nothing."""
    traces = agg.setting_traces
    by = agg.layout.by
    rows = [r for r in SETTING_ROWS if r[0] in traces.columns and traces[r[0]].drop_nulls().len()]
    colours = _colours(group_labels(traces, by))
    levels = {label: group["no_learning_loss"].drop_nulls().mean()
              for label, group in _lines(agg.extras, by)} if agg.extras.height else {}
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.8 * len(rows)), squeeze=False, sharex=True)
    for ax, (column, ylabel) in zip(axes[:, 0], rows):
        for label, group in _lines(traces, by):
            group = group.sort("bin")
            if not group[column].drop_nulls().len():
                continue
            ax.plot(group["examples_seen"], values(group[column]), color=colours[label],
                    linewidth=1.1, label=f"{label} (n={int(group[f'{column}_n'].max())})")
            ax.fill_between(group["examples_seen"].to_numpy(), values(group[f"{column}_ci_low"]),
                            values(group[f"{column}_ci_high"]), color=colours[label], alpha=0.18,
                            linewidth=0)
            if column == "loss":
                _no_learning(ax, levels.get(label), colours[label])
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel(EXAMPLES_LABEL)
    handles = axes[0][0].get_legend_handles_labels()[0]
    if 0 < len(handles) <= MAX_LEGEND_LINES:
        axes[0][0].legend(fontsize=7, ncol=2)
    axes[0][0].set_title(f"Per setting: mean over seeds, band = {CI_METHOD}; dashed = the "
                         "setting's no-learning loss", fontsize=9)
    return save(fig, out, "training_curves")


def plot_spike_rms(agg: Aggregates, out: Path) -> list[Path]:
    """The update RMS around loss spikes (Wortsman et al. 2023 §3.4): the event-triggered average
    of rms_max and rms_patch_embed at steps −20…+20 from each loss-spike onset, mean ± t-band over
    onsets, with the predictor's lookback shaded and the RMS before an average step dotted."""
    spikes = agg.spikes
    assert spikes is not None, "plot_spike_rms needs a study with loss spikes (agg.spikes)"
    eta = spikes.eta
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.axvspan(-spikes.lookback - 0.5, -0.5, color="grey", alpha=0.12,
               label=f"predictor's lookback ({spikes.lookback} steps)")
    for column, colour in (("rms_max", "C0"), ("rms_patch_embed", "C1")):
        if column not in eta.columns or not eta[column].drop_nulls().len():
            continue
        ax.plot(eta["offset"], values(eta[column]), color=colour, marker=".",
                label=f"{column} (n ≤ {int(eta[f'{column}_n'].max())} onsets)")
        ax.fill_between(eta["offset"].to_numpy(), values(eta[f"{column}_ci_low"]),
                        values(eta[f"{column}_ci_high"]), color=colour, alpha=0.2, linewidth=0)
    ax.axvline(0, color="black", linewidth=1, label="loss-spike onset")
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="Adam's steady RMS (1)")
    ax.set_xlabel("steps from the loss-spike onset")
    ax.set_ylabel("update RMS, sqrt(mean(g² / v̂))")
    ax.set_title(f"Update RMS around {spikes.events} loss-spike onsets: mean, band = "
                 f"{CI_METHOD.replace('over seeds', 'over onsets')}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out, "spike_rms")


def plot_spike_prediction(agg: Aggregates, out: Path) -> list[Path]:
    """Recall and precision of "rms_max > r in the lookback" against r, observed and under
    shuffled spike times (the chance level)."""
    spikes = agg.spikes
    assert spikes is not None, "plot_spike_prediction needs a study with loss spikes (agg.spikes)"
    table = spikes.prediction
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, (column, title) in zip(axes[0], (("recall", "recall: onsets the predictor fired on"),
                                             ("precision", "precision: alarms with an onset"))):
        ax.plot(table["threshold"], values(table[column], 100), marker="o", label="observed")
        ax.plot(table["threshold"], values(table[f"control_{column}"], 100), marker="s",
                linestyle="--", color="grey",
                label=f"spike times shuffled within trials (mean of {spikes.n_shuffles})")
        ax.set_xscale("log")
        ax.set_xticks(table["threshold"].to_list(), [f"{r:g}" for r in table["threshold"]])
        ax.minorticks_off()
        ax.set_xlabel("threshold r on rms_max")
        ax.set_ylabel("%")
        ax.set_ylim(-3, 103)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Does rms_max > r at any of the {spikes.lookback} steps before predict a loss "
                 f"spike? ({spikes.events} onsets, {spikes.trials} trials)", fontsize=11)
    return save(fig, out, "spike_prediction")


LEVEL_TEXT = f"{CI_METHOD.split(' of the mean')[0]} (fractions: Wilson)"
KNOB_PANELS = (("loss_spike_rate_per_1k", "loss spikes per 1,000 steps", 1.0),
               ("diverged", "fraction diverged (Wilson CI)", 1.0),
               ("collapse_fraction", "steps at the no-learning loss (%)", 100.0),
               ("zeroshot_top1", "final zero-shot top-1 (%)", 100.0))


def plot_knob_effects(agg: Aggregates, out: Path) -> list[Path]:
    """Each swept instability knob (rows) against loss-spike rate, divergence and final accuracy
    (columns): one point per knob value, pooled over the other settings, with its interval."""
    levels = agg.knobs.levels
    knobs = list(dict.fromkeys(levels["knob"].to_list()))
    fig, axes = plt.subplots(len(knobs), len(KNOB_PANELS), figsize=(13, 3.2 * len(knobs)),
                             squeeze=False)
    for i, knob in enumerate(knobs):
        for j, (metric, ylabel, scale) in enumerate(KNOB_PANELS):
            ax = axes[i][j]
            part = levels.filter((pl.col("knob") == knob) & (pl.col("metric") == metric))
            for k, row in enumerate(part.iter_rows(named=True)):
                if row["mean"] is None:
                    continue
                mean = scale * row["mean"]
                if row["ci_low"] is None:
                    ax.plot([k], [mean], "o", color="C0")
                else:
                    ax.errorbar([k], [mean], yerr=[[mean - scale * row["ci_low"]],
                                                   [scale * row["ci_high"] - mean]],
                                fmt="o", capsize=4, color="C0")
            ax.set_xticks(range(part.height),
                          [f"{v}\n(n={n})" for v, n in zip(part["value"], part["n"])], fontsize=8)
            ax.set_xlim(-0.5, part.height - 0.5)
            ax.set_xlabel(axis_name(knob))
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle(f"Instability knobs, each pooled over the other settings: mean with {LEVEL_TEXT}",
                 fontsize=11)
    return save(fig, out, "instability_knobs")


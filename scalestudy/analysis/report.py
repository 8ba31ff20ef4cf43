"""`scalestudy report RUN_DIR`: figures, tables, fits and findings, from the store alone.

Writes RUN_DIR/report/ (every interval over seeds a Student-t interval of the mean, `stats`):
- accuracy_vs_batch.png|svg  zero-shot top-1 against batch size (log2), one line per setting, mean
                             and t-band over seeds, saturating power-law fits dashed (a study
                             without a batch-size sweep: one point per setting instead)
- accuracy_vs_examples.png|svg, accuracy_vs_steps.png|svg
                             accuracy during training (evals.parquet): zero-shot top-1, per
                             attribute, linear probe, per setting with t-bands (when evaluated)
- retrieval_vs_batch.png|svg image→text and text→image recall@1, the same way
- training_curves.png|svg    loss (with each setting's no-learning loss dashed), temperature and
                             bias over training per setting, t-bands over seeds
- instability.png|svg        grad-norm and loss spike rates, worst ratios, fraction diverged
- instability_knobs.png|svg  each swept knob (β2, optimizer, LR, loss) against loss-spike rate,
                             divergence and accuracy (when one is swept)
- spike_rms.png|svg          update RMS around loss-spike onsets, and
  spike_prediction.png|svg   how well it predicts them against shuffled spike times (when a trial
                             has loss spikes and the update RMS)
- init_sensitivity.png|svg   final accuracy over the bias × temperature init grid (studies that
  early_loss.png|svg         sweep an init) and the early training loss per init
- traces.png|svg             per-trial loss (▲ loss spikes, no-learning level dashed), grad norm
                             (× spikes), temperature, bias, update RMS
- grad_norm.png|svg          every trial's grad norm with spikes, one panel per loss
- results.csv                the trial table;  groups.csv  per-setting counts, means and CIs,
                             stalled trials and duplicate-caption rate
- index.html, index.md       all of it with a generated summary (plain HTML, works offline)
"""

from __future__ import annotations

import argparse
import html
from collections.abc import Callable, Mapping
from pathlib import Path

import polars as pl

from scalestudy.analysis import figures
from scalestudy.analysis.aggregate import CI_METHOD, Aggregates, aggregate, curve_trials
from scalestudy.analysis.fits import FitFailure, FitSummary, fit_groups
from scalestudy.analysis.labels import group_labels
from scalestudy.analysis.summary import STALL_TEXT, findings
from scalestudy.errors import UsageError
from scalestudy.store import RunStore, atomic_write_text, write_results

TABLE_COLUMNS = ["trial_id", "status", "final_loss", "no_learning_loss", "stalled",
                 "zeroshot_top1", "best_zeroshot_top1", "linear_probe_top1", "retrieval_i2t_r1",
                 "retrieval_t2i_r1", "spike_count", "max_spike_ratio", "spike_rate_per_1k",
                 "loss_spike_count", "loss_spike_rate_per_1k", "dup_caption_rate", "wall_s",
                 "samples_per_s", "error"]


def accuracy_fits(agg: Aggregates) -> list[FitSummary | FitFailure]:
    """One saturating power-law fit per line, when batch size is swept (else none)."""
    lay = agg.layout
    if lay.x is None:
        return []
    used = curve_trials(agg.trials, agg.include_diverged)
    return fit_groups(used, lay.x, "zeroshot_top1", lay.hue, group_labels(used, lay.hue))


def group_table(agg: Aggregates) -> pl.DataFrame:
    """Per setting: trial counts by outcome and how many stalled, then mean and t-interval of each
    curve metric, the spike rates and the mean duplicate-caption rate."""
    by = agg.layout.by
    table = agg.counts.join(agg.extras.select(by + ["stalled"]), on=by, how="left", nulls_equal=True)
    for metric, stats in agg.curves.items():
        if not stats.height:
            continue
        table = table.join(
            stats.select(by + [pl.col("mean").alias(metric), pl.col("ci_low").alias(f"{metric}_ci_low"),
                               pl.col("ci_high").alias(f"{metric}_ci_high")]),
            on=by, how="left", nulls_equal=True)
    rates = agg.instability.select(by + ["spike_rate_per_1k", "loss_spike_rate_per_1k"])
    return (table.join(rates, on=by, how="left", nulls_equal=True)
            .join(agg.extras.select(by + ["dup_caption_rate"]), on=by, how="left", nulls_equal=True))


def stalled_table(agg: Aggregates) -> pl.DataFrame:
    """Per setting with a result: trials, how many stalled, the no-learning loss and the mean
    final loss (a stalled trial ends at that level: train.summary.STALL_TOLERANCE)."""
    by = agg.layout.by
    ran = agg.counts.select(by + [(pl.col("done") + pl.col("diverged")).alias("with_result")])
    return ran.join(agg.extras.select(by + ["stalled", "no_learning_loss", "final_loss_mean"]),
                    on=by, how="left", nulls_equal=True)


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _html_table(frame: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in frame.iter_rows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(frame: pl.DataFrame) -> list[str]:
    return (["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
            + ["| " + " | ".join(_fmt(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |"
               for row in frame.iter_rows()])


FIGURE_TITLES = {
    "accuracy_vs_batch": "Zero-shot accuracy",
    "accuracy_vs_examples": "Accuracy during training, against examples seen",
    "accuracy_vs_steps": "Accuracy during training, against steps",
    "retrieval_vs_batch": "Retrieval",
    "training_curves": "Loss, temperature and bias per setting",
    "instability": "Instability",
    "instability_knobs": "Instability knobs",
    "spike_rms": "Update RMS around loss spikes",
    "spike_prediction": "Does the update RMS predict loss spikes?",
    "init_sensitivity": "Bias / temperature init sensitivity",
    "early_loss": "Early training loss",
    "traces": "Per-trial traces",
    "grad_norm": "Gradient norms",
}


STALLED_NOTE = (f"A trial stalled when its final loss is {STALL_TEXT}: the loss of one shared "
                "logit for every pair, what a model that learned nothing about which caption goes "
                "with which image reaches.")


def draw_figures(agg: Aggregates, fits: list[FitSummary | FitFailure], out: Path) -> list[str]:
    """Every figure that applies to this study; returns their names (files are NAME.png|svg)."""
    figures.plot_accuracy(agg, fits, out)
    names = ["accuracy_vs_batch"]
    if agg.evals.height:
        figures.plot_eval_curves(agg, out, "examples_seen")
        figures.plot_eval_curves(agg, out, "step")
        names += ["accuracy_vs_examples", "accuracy_vs_steps"]
    figures.plot_retrieval(agg, out)
    names.append("retrieval_vs_batch")
    if agg.setting_traces.height:
        figures.plot_setting_traces(agg, out)
        names.append("training_curves")
    figures.plot_instability(agg, out)
    names.append("instability")
    if agg.knobs.levels.height:
        figures.plot_knob_effects(agg, out)
        names.append("instability_knobs")
    if agg.spikes is not None:
        figures.plot_spike_rms(agg, out)
        figures.plot_spike_prediction(agg, out)
        names += ["spike_rms", "spike_prediction"]
    if figures.has_init_grid(agg.layout):
        figures.plot_init_heatmap(agg, out)
        names.append("init_sensitivity")
    if figures.has_init_grid(agg.layout) or agg.layout.x is None:
        # Settings compared at one batch size (inits, loss variants) differ most early on.
        figures.plot_early_loss(agg, out)
        names.append("early_loss")
    if not agg.traces.is_empty():
        figures.plot_traces(agg, out)
        names.append("traces")
    figures.plot_grad_norms(agg, out)
    return names + ["grad_norm"]


def write_report(store: RunStore, include_diverged: bool = True) -> Path:
    """Write the report under RUN_DIR/report/ and return the path of its index.html."""
    write_results(store)
    manifest = store.manifest()
    axes = manifest.axes
    agg = aggregate(store.root, axes, include_diverged=include_diverged)
    out = store.report_dir
    out.mkdir(parents=True, exist_ok=True)
    columns = TABLE_COLUMNS[:2] + axes + TABLE_COLUMNS[2:]
    table = agg.trials.select([c for c in columns if c in agg.trials.columns])
    table.write_csv(out / "results.csv")
    groups = group_table(agg)
    groups.write_csv(out / "groups.csv")
    fits = accuracy_fits(agg)
    names = draw_figures(agg, fits, out)
    items = findings(agg, fits)
    title = f"Report: {store.root.name}"
    description = manifest.description or f"Study {manifest.name}."

    markdown = [f"# {title}", "", description, "", "## Summary", ""]
    for item in items:
        first, *rest = item.split("\n")
        markdown += [f"- {first}"] + [f"  - {line.strip()}" for line in rest]
    for name in names:
        markdown += ["", f"## {FIGURE_TITLES[name]}", "", f"![{FIGURE_TITLES[name]}]({name}.png)"]
    stalled = stalled_table(agg)
    markdown += ["", f"## Settings ({CI_METHOD})", ""] + _md_table(groups)
    markdown += ["", "## Stalled trials per setting", "", STALLED_NOTE, ""] + _md_table(stalled)
    markdown += ["", "## Trials", ""] + _md_table(table)
    atomic_write_text(out / "index.md", "\n".join(markdown) + "\n")

    summary_html = "".join(
        "<li>" + "<br>".join(html.escape(line.strip()) for line in item.split("\n")) + "</li>"
        for item in items
    )
    figures_html = "".join(
        f"<h2>{html.escape(FIGURE_TITLES[n])}</h2><img src='{n}.png' alt='{html.escape(FIGURE_TITLES[n])}'>"
        f"<p><a href='{n}.svg'>{n}.svg</a> (vector, for papers)</p>"
        for n in names
    )
    page = (
        "<!doctype html><meta charset='utf-8'>"
        f"<title>scalestudy {html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 5px}"
        "img{max-width:100%}li{margin:.4em 0}</style>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(description)}</p>"
        f"<h2>Summary</h2><ul>{summary_html}</ul>{figures_html}"
        f"<h2>Settings ({html.escape(CI_METHOD)})</h2>{_html_table(groups)}"
        f"<p>Also as <a href='groups.csv'>groups.csv</a>.</p>"
        f"<h2>Stalled trials per setting</h2><p>{html.escape(STALLED_NOTE)}</p>{_html_table(stalled)}"
        f"<h2>Trials</h2>{_html_table(table)}<p>Also as <a href='results.csv'>results.csv</a>.</p>"
    )
    atomic_write_text(out / "index.html", page)
    return out / "index.html"


def export(store: RunStore, out: Path, names: list[str], include_diverged: bool = True,
           extra: str = "", optional: Mapping[str, str] | None = None) -> list[Path]:
    """Write the report, then copy the PNGs `names` and the findings (findings.md) into `out`.

    What a per-study recipe in analysis/ runs, so the figures a reader sees in the repository are
    exactly the report's. `extra` is markdown the recipe adds to findings.md (a table it computes).
    `optional` maps figures that only some outcomes draw to why they would be missing: a drawn one
    is copied; a missing one is said so in findings.md, and a stale copy of it in `out` removed.
    """
    write_report(store, include_diverged=include_diverged)
    out.mkdir(parents=True, exist_ok=True)
    copied, missing = [], []
    for name, why in (optional or {}).items():
        if (store.report_dir / f"{name}.png").exists():
            names = [*names, name]
        else:
            missing.append(f"- {name} was not drawn: {why}.")
            (out / f"{name}.png").unlink(missing_ok=True)
    for name in names:
        source = store.report_dir / f"{name}.png"
        if not source.exists():
            raise UsageError(f"{source} was not drawn: this study has no {name} figure "
                             f"(drawn: {sorted(p.stem for p in store.report_dir.glob('*.png'))})")
        copied.append(out / source.name)
        copied[-1].write_bytes(source.read_bytes())
    markdown = (store.report_dir / "index.md").read_text()
    summary = markdown[markdown.index("## Summary"):markdown.index("\n## ", markdown.index("## Summary") + 1)]
    groups = markdown[markdown.index("## Settings"):markdown.index("\n## Trials")]
    manifest = store.manifest()
    atomic_write_text(out / "findings.md", f"# {store.root.name}: findings (generated by its recipe)\n\n"
                      f"{manifest.description or f'Study {manifest.name}.'}\n\n{summary.strip()}\n\n"
                      f"{groups.strip()}\n" + (f"\n{extra.strip()}\n" if extra.strip() else "")
                      + ("\n## Figures not drawn\n\n" + "\n".join(missing) + "\n" if missing else ""))
    return copied + [out / "findings.md"]


def recipe_main(argv: list[str] | None, names: list[str], default_out: Path, doc: str,
                extra: Callable[[RunStore], str] | None = None,
                optional: Mapping[str, str] | None = None) -> int:
    """The command line every recipe in analysis/ shares: RUN_DIR [--out DIR] [--exclude-diverged].

    `extra(store)` returns markdown for findings.md that the recipe computes itself; `optional` as
    in `export`."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("run_dir", help="the study's run directory (OUT/<study name>)")
    parser.add_argument("--out", type=Path, default=default_out,
                        help=f"where the figures and findings.md go (default {default_out})")
    parser.add_argument("--exclude-diverged", action="store_true",
                        help="leave diverged seeds out of the curves")
    args = parser.parse_args(argv)
    store = RunStore.open(args.run_dir)
    for path in export(store, args.out, names, not args.exclude_diverged,
                       extra(store) if extra else "", optional):
        print(path)
    return 0

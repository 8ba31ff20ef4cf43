"""`scalestudy report RUN_DIR`: the results table and the figures, from the store alone.

Writes RUN_DIR/report/: accuracy_vs_batch.png (zero-shot top-1 against batch size on a log2 axis,
one line per loss, mean ± std over seeds), grad_norm.png (every trial's per-step gradient norm with
spikes marked), results.csv, and index.html / index.md with the trial table.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none is there on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

from scalestudy.results import study_axes, write_results  # noqa: E402
from scalestudy.store import RunStore  # noqa: E402

TABLE_COLUMNS = ["trial_id", "status", "final_loss", "zeroshot_top1", "best_zeroshot_top1",
                 "retrieval_i2t_r1", "retrieval_t2i_r1", "spike_count", "max_spike_ratio",
                 "wall_s", "samples_per_s"]


def seed_curves(frame: pl.DataFrame, x: str, y: str, by: str) -> pl.DataFrame:
    """Mean, std and count of `y` over seeds for each (`by`, `x`), finished trials only."""
    return (
        frame.filter(pl.col("status").is_in(["done", "diverged"]) & pl.col(y).is_not_null())
        .group_by(by, x)
        .agg(pl.col(y).mean().alias("mean"), pl.col(y).std().fill_null(0.0).alias("std"),
             pl.len().alias("seeds"))
        .sort(by, x)
    )


def plot_accuracy_vs_batch(frame: pl.DataFrame, path: Path) -> None:
    curves = seed_curves(frame, "train.batch_size", "zeroshot_top1", "loss.kind")
    fig, ax = plt.subplots(figsize=(6, 4))
    for (kind,), group in curves.group_by("loss.kind", maintain_order=True):
        xs, mean, std = group["train.batch_size"], group["mean"], group["std"]
        line, = ax.plot(xs, mean, marker="o", label=f"{kind} (n={group['seeds'].max()} seeds)")
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    chance = frame["zeroshot_chance"].drop_nulls()
    if chance.len():
        ax.axhline(chance[0], color="grey", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    sizes = sorted(curves["train.batch_size"].unique().to_list())
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size (pairs per step, log2)")
    ax.set_ylabel("zero-shot top-1 (fraction)")
    ax.set_title("Zero-shot accuracy vs batch size (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grad_norms(store: RunStore, frame: pl.DataFrame, path: Path) -> None:
    kinds = sorted(frame["loss.kind"].unique().to_list())
    fig, axes = plt.subplots(len(kinds), 1, figsize=(8, 3 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        trials = frame.filter(pl.col("loss.kind") == kind).sort("train.batch_size")
        for row in trials.iter_rows(named=True):
            metrics = store.trial(row["trial_id"]).metrics()
            if metrics.is_empty():
                continue
            label = f"B={row['train.batch_size']} seed={row['train.seed']}"
            line, = ax.plot(metrics["step"], metrics["grad_norm"], linewidth=0.8, label=label)
            spikes = metrics.filter(pl.col("is_spike"))
            ax.scatter(spikes["step"], spikes["grad_norm"], marker="x", color="red", zorder=3,
                       s=30)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("gradient norm (pre-clip)")
        ax.set_title(f"{kind}: per-step gradient norm, spikes marked ×")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _html_table(frame: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in frame.iter_rows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(store: RunStore) -> Path:
    """Write the report and return the path of its index.html."""
    frame = write_results(store).filter(pl.col("in_study"))
    out = store.report_dir
    out.mkdir(parents=True, exist_ok=True)
    columns = TABLE_COLUMNS[:2] + study_axes(store) + TABLE_COLUMNS[2:]
    table = frame.select([c for c in columns if c in frame.columns])
    table.write_csv(out / "results.csv")
    plot_accuracy_vs_batch(frame, out / "accuracy_vs_batch.png")
    plot_grad_norms(store, frame, out / "grad_norm.png")

    md_rows = [[_fmt(v) for v in row] for row in table.iter_rows()]
    markdown = "\n".join(
        [f"# Report: {store.root.name}", "", "![accuracy vs batch](accuracy_vs_batch.png)", "",
         "![gradient norms](grad_norm.png)", "",
         "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
        + ["| " + " | ".join(r) + " |" for r in md_rows]
    )
    (out / "index.md").write_text(markdown + "\n")
    (out / "index.html").write_text(
        "<!doctype html><meta charset='utf-8'>"
        f"<title>scalestudy report: {html.escape(store.root.name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}</style>"
        f"<h1>Report: {html.escape(store.root.name)}</h1>"
        "<img src='accuracy_vs_batch.png' alt='zero-shot accuracy vs batch size'>"
        "<img src='grad_norm.png' alt='gradient norm traces'>"
        f"<h2>Trials</h2>{_html_table(table)}"
    )
    return out / "index.html"

"""How long does `report`'s aggregation take on a big study? Target (issue 4): under 5 s for
1,000 trials × 10,000 steps.

Writes a synthetic run directory with the store's own writers (scalestudy.analysis.synthetic:
2 losses × 10 batch sizes × 2 β2 × 25 seeds, 2 % diverged, 1 % failed, every trial 10,000 steps
of the full per-step column set, one compacted metrics part each, as a finished trial leaves it),
then times `aggregate()` — results.parquet scanned, per-setting means and 2,000-replicate bootstrap
CIs of four metrics, status counts, instability, and the step frame (10 M rows) reduced to 200
bins per trial plus the early-training view — over --repeats rounds. The store is reused when it
is already there (writing it takes minutes). Also timed once, for information: rebuilding
results.parquet from the trial directories, the fits, and the figures.

    .venv/bin/python benchmarks/bench_report.py [--trials 1000] [--steps 10000] [--repeats 5]
        [--dir /tmp/scalestudy-bench-report]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import polars as pl

from scalestudy.analysis.aggregate import aggregate
from scalestudy.analysis.report import accuracy_fits, draw_figures
from scalestudy.analysis.synthetic import write_synthetic_run
from scalestudy.store import RunStore, Trial, write_results

BATCH_SIZES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
AXES = ["loss.kind", "optim.beta2", "train.batch_size", "train.seed"]


def bench_study(trials: int) -> dict:
    seeds = max(1, trials // (2 * 2 * len(BATCH_SIZES)))
    return {
        "name": "bench_report",
        "base": {"train": {"examples_seen": 8192}},
        "sweep": {"grid": {"loss.kind": ["softmax", "sigmoid"], "optim.beta2": [0.999, 0.95],
                           "train.batch_size": BATCH_SIZES, "train.seed": list(range(seeds))}},
    }


def outcome(trial: Trial) -> str:
    """Deterministic mix: 2 % diverged (at the largest batch sizes), 1 % failed."""
    key = int(trial.trial_id, 16) % 100
    if key < 2 and trial.config.train.batch_size >= 1024:
        return "diverged"
    return "failed" if key == 99 else "done"


def timed(label: str, fn, repeats: int = 1) -> list[float]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    shown = ", ".join(f"{t:.2f}" for t in times)
    print(f"{label}: median {statistics.median(times):.2f} s ({shown})", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/scalestudy-bench-report")
    args = parser.parse_args()

    study = bench_study(args.trials)
    store = RunStore(Path(args.dir) / study["name"])
    if not store.results_path.exists():
        print(f"writing {args.trials} trials × {args.steps} steps under {store.root} …", flush=True)
        timed("write the synthetic store", lambda: write_synthetic_run(
            args.dir, study, steps=args.steps, status_of=outcome))
    trials = pl.read_parquet(store.results_path)
    print(f"{trials.height} trials ({dict(trials['status'].value_counts().iter_rows())}), "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    times = timed("aggregate (the report's aggregation)", lambda: aggregate(store.root, AXES),
                  args.repeats)
    agg = aggregate(store.root, AXES)
    steps = int(trials["step"].sum())
    print(f"  {steps:,} steps read; {agg.traces.height:,} trace bins, {agg.early.height:,} early "
          f"bins; target < 5 s: {'met' if statistics.median(times) < 5 else 'MISSED'}")
    timed("write_results (results.parquet from the trial directories)", lambda: write_results(store))
    fits = []
    timed("fits (one per line, 1,000 bootstrap refits each)",
          lambda: fits.extend(accuracy_fits(agg)))
    out = Path(args.dir) / "figures"
    out.mkdir(exist_ok=True)
    timed("figures (PNG + SVG)", lambda: draw_figures(agg, fits, out))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

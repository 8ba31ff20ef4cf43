"""How long does `report`'s aggregation take on a big study? Target (issue 4): under 5 s for
1,000 trials × 10,000 steps.

Writes a synthetic run directory with the store's own writers (scalestudy.analysis.synthetic:
2 losses × 10 batch sizes × 2 β2 × 25 seeds, 2 % diverged, 1 % failed, every trial 10,000 steps
of the full per-step column set, one compacted metrics part each, as a finished trial leaves it,
10 evaluations, and loss spikes planted after update-RMS bumps, 3 per 1,000 steps at β2 = 0.999
and 1 at 0.95), then times `aggregate()` — results.parquet scanned, per-setting means and
Student-t CIs of five metrics, status counts, instability, the step frame (10 M rows) reduced to
200 bins per trial plus the early-training view and per-setting traces, the evaluations averaged
per step, and the loss-spike analyses (event-triggered RMS, the RMS predictor against 200
within-trial shuffles, knob effects) — over --repeats rounds. The store is reused when it is
already there (writing it takes minutes). Also timed once, for information: the spike analyses on
their own, rebuilding results.parquet from the trial directories, the fits, and the figures.

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

from scalestudy.analysis.aggregate import aggregate, scan_steps
from scalestudy.analysis.instability import spike_analysis
from scalestudy.analysis.report import accuracy_fits, draw_figures
from scalestudy.analysis.synthetic import PlantedSpikes, write_synthetic_run
from scalestudy.store import RESULTS, RunStore, Trial, write_results

BATCH_SIZES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
AXES = ["loss.kind", "optim.beta2", "train.batch_size", "train.seed"]


def bench_study(trials: int) -> dict:
    seeds = max(1, trials // (2 * 2 * len(BATCH_SIZES)))
    return {
        "name": "bench_report",
        "base": {"train": {"examples_seen": 8192, "eval_every": 1000}},
        "sweep": {"grid": {"loss.kind": ["softmax", "sigmoid"], "optim.beta2": [0.999, 0.95],
                           "train.batch_size": BATCH_SIZES, "train.seed": list(range(seeds))}},
    }


def outcome(trial: Trial) -> str:
    """Deterministic mix: 2 % diverged (at the largest batch sizes), 1 % failed."""
    key = int(trial.trial_id, 16) % 100
    if key < 2 and trial.config.train.batch_size >= 1024:
        return "diverged"
    return "failed" if key == 99 else "done"


def planted_rate(trial: Trial) -> float:
    """Loss spikes per 1,000 steps planted in a trial: more with β2 = 0.999 (SigLIP §4.4)."""
    return 3.0 if trial.config.optim.beta2 > 0.99 else 1.0


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
            args.dir, study, steps=args.steps, status_of=outcome, spikes=PlantedSpikes(planted_rate)))
    trials = pl.read_parquet(store.results_path)
    print(f"{trials.height} trials ({dict(trials['status'].value_counts().iter_rows())}), "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    times = timed("aggregate (the report's aggregation)", lambda: aggregate(store.root, AXES),
                  args.repeats)
    agg = aggregate(store.root, AXES)
    steps = int(trials["step"].sum())
    print(f"  {steps:,} steps read; {agg.traces.height:,} trace bins, {agg.early.height:,} early "
          f"bins, {agg.evals.height:,} evaluation points, "
          f"{agg.spikes.events if agg.spikes else 0:,} loss-spike onsets; "
          f"target < 5 s: {'met' if statistics.median(times) < 5 else 'MISSED'}")
    ran = trials.filter(trials["status"].is_in(RESULTS) & trials["in_study"])
    timed("  of which the loss-spike analyses", lambda: spike_analysis(
        scan_steps(store.root, ran["trial_id"].to_list()), ran))
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

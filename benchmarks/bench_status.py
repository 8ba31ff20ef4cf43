"""How long does `scalestudy status` take on a big run directory? Target (issue 10): ≤ 1 s for
1,000 trials on the 2-core machine.

Writes a synthetic run directory of --trials finished trials with the store's own writers
(scalestudy.analysis.synthetic; 100 steps each: `status` reads no step), then times the whole
command in-process — manifest, every trial's config/state/summary read and flattened into the
results frame, the table printed — over --repeats rounds. Also timed: `run` of the same study
when every trial is already finished (one expansion, the reconciliation of 1,000 stored trials,
results.parquet rewritten), the command a user re-runs most.

    .venv/bin/python benchmarks/bench_status.py [--trials 1000] [--repeats 5]
        [--dir /tmp/scalestudy-bench-status]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time
from pathlib import Path

import yaml

from scalestudy.analysis.synthetic import write_synthetic_run
from scalestudy.cli import main


def bench_study(trials: int) -> dict:
    seeds = max(1, trials // (2 * 5 * 4))
    return {
        "name": "bench_status",
        "base": {"train": {"examples_seen": 100 * 64, "batch_size": 64}},
        "sweep": {"grid": {"loss.kind": ["softmax", "sigmoid"], "optim.lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
                           "optim.beta2": [0.9, 0.95, 0.99, 0.999], "train.seed": list(range(seeds))}},
    }


def timed(fn, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert fn() == 0
        times.append(time.perf_counter() - start)
    return times


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/scalestudy-bench-status"))
    args = parser.parse_args()
    study = bench_study(args.trials)
    run_dir = args.dir / study["name"]
    if not run_dir.exists():
        start = time.perf_counter()
        write_synthetic_run(args.dir, study, steps=100)
        print(f"wrote {run_dir} in {time.perf_counter() - start:.0f} s")
    study_file = args.dir / "study.yaml"
    study_file.write_text(yaml.safe_dump(study))
    trials = len(os.listdir(run_dir / "trials"))
    print(f"load average {os.getloadavg()[0]:.2f}; {trials} trials")
    for label, command in (("status", ["status", str(run_dir)]),
                           ("status --json", ["status", str(run_dir), "--json"]),
                           ("run (all finished)", ["run", str(study_file), "--out", str(args.dir)])):
        times = timed(lambda: main(command), args.repeats)
        print(f"{label:20s} median {statistics.median(times):.3f} s   runs "
              + ", ".join(f"{t:.3f}" for t in times))
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main_bench()

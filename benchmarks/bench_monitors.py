"""Training throughput of the quickstart model at batch 256 with the extended monitors on and off.

    .venv/bin/python benchmarks/bench_monitors.py [--runs 5] [--steps 30]

Each run trains a fresh trial in this process (2 torch threads) and reads samples/s from its
summary (step time only: set-up and evaluation excluded). On and off runs alternate so machine
noise hits both alike; the table reports the median of each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from scalestudy.expand import Derived, Trial, derive, trial_id
from scalestudy.spec import TrialConfig
from scalestudy.store import RunStore
from scalestudy.train.loop import run_trial


def throughput(extended: bool, steps: int, root: Path) -> float:
    config = TrialConfig(
        train={"batch_size": 256, "examples_seen": 256 * steps, "eval_every": 0,
               "checkpoint_every": 0},
        monitor={"extended": extended},
        resources={"cpus": 2},
        data={"eval_images": 64},
    )
    derived: Derived = derive(config)
    trial = Trial(trial_id=trial_id(config), config=config, derived=derived, swept={})
    store = RunStore(root / f"{'on' if extended else 'off'}-{len(list(root.iterdir()))}")
    summary = run_trial(str(store.add_trial(trial).path))
    assert summary is not None
    return float(summary["samples_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    results: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            for extended in (False, True):
                results[extended].append(throughput(extended, args.steps, Path(tmp)))
    off, on = statistics.median(results[False]), statistics.median(results[True])
    print("| monitors | samples/s (median) | runs |")
    print("|---|---|---|")
    print(f"| off (grad norm + spikes only) | {off:.0f} | {', '.join(f'{v:.0f}' for v in results[False])} |")
    print(f"| on (all monitors) | {on:.0f} | {', '.join(f'{v:.0f}' for v in results[True])} |")
    print(f"\nmonitor cost: {100 * (off - on) / off:.1f}% of throughput")


if __name__ == "__main__":
    main()

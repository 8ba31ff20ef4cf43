"""Step time of real trials: the canonical studies' tiny model at small batch (the per-step
overhead the CPU studies pay), and the quickstart model's throughput with monitors on and off.

    .venv/bin/python benchmarks/bench_step.py [--steps 300] [--threads 1]

Each case trains a real trial in this process through the trial entry point (`run_trial`) and
reads its per-step `step_time_s` (the loop's wall time from one step's start to the next: data,
tokenizer, forward, loss, backward, monitors, optimizer); the first 20 steps are dropped as
warm-up, and the median of the rest is reported. Target (issue 12): ≤ 5 ms median for the tiny
model at B = 16 with every monitor on, on the 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from scalestudy.expand import derive, trial_id
from scalestudy.spec import TrialConfig
from scalestudy.store import RunStore, Trial
from scalestudy.train.loop import run_trial

TINY = {"width": 32, "depth": 1, "heads": 2, "embed_dim": 32}
WARMUP = 20


def step_times(root: Path, name: str, steps: int, threads: int, **config: Any) -> list[float]:
    values = {"train": {"eval_every": 0, "checkpoint_every": 0}, "data": {"eval_images": 64},
              "resources": {"cpus": threads}}
    for section, keys in config.items():
        values.setdefault(section, {}).update(keys)
    values["train"]["examples_seen"] = values["train"]["batch_size"] * (steps + WARMUP)
    cfg = TrialConfig.model_validate(values)
    trial = Trial(trial_id=trial_id(cfg), config=cfg, derived=derive(cfg), swept={})
    store = RunStore(root / name)
    ts = store.add_trial(trial)
    run_trial(str(ts.path))
    return ts.metrics()["step_time_s"].to_list()[WARMUP:]


CASES = {
    "tiny model, B=16, monitors on": dict(model=TINY, train={"batch_size": 16}),
    "tiny model, B=16, monitors off": dict(model=TINY, train={"batch_size": 16},
                                           monitor={"extended": False}),
    "tiny model, B=512, monitors on": dict(model=TINY, train={"batch_size": 512}),
    "quickstart model, B=256, monitors on": dict(train={"batch_size": 256}),
    "quickstart model, B=256, monitors off": dict(train={"batch_size": 256},
                                                  monitor={"extended": False}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", help="run only the cases whose name contains this")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}, torch threads {args.threads}")
    print("| case | median step (ms) | p90 (ms) | samples/s |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, config) in enumerate(CASES.items()):
            if args.only and args.only not in name:
                continue
            steps = args.steps if "B=16" in name else max(30, args.steps // 10)
            times = step_times(Path(tmp), f"case{i}", steps, args.threads, **config)
            median = statistics.median(times)
            p90 = statistics.quantiles(times, n=10)[-1]
            batch = config["train"]["batch_size"]
            print(f"| {name} | {1000 * median:.2f} | {1000 * p90:.2f} | {batch / median:.0f} |")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

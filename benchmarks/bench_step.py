"""Step time of real trials: the canonical studies' tiny model at small batch (the per-step
overhead the CPU studies pay), and the quickstart model's throughput with monitors on and off;
and the peak memory of one large-batch step with and without micro-batching.

    .venv/bin/python benchmarks/bench_step.py [--steps 300] [--threads 1] [--only B=16]
                                              [--allocator auto|tcmalloc|jemalloc|system]
    .venv/bin/python benchmarks/bench_step.py --memory [--batch 16384] [--micro 1024 2048]

Each case trains a real trial in a process of its own, started as the executors start one (the
trial entry point `python -m scalestudy.trial`, with the environment `trial_env` gives it: its
threads and its `resources.allocator` preloaded), and reads its per-step `step_time_s` (the
loop's wall time from one step's start to the next: data, tokenizer, forward, loss, backward,
monitors, optimizer); the first 20 steps are dropped as warm-up; the median and the mean of the
rest are reported. Target (issue 12): a median of ≤ 5 ms for the tiny model at B = 16 with every
monitor on, on the 2-core machine. Read the mean beside it: the shapes data renders a run of
steps' images at once (up to 32 batches at B = 16), so one step in 32 pays for the run's
rendering and the median leaves that cost out.

`--memory`: one optimisation step of the tiny model at B = `--batch` (sigmoid loss chunked by
1024, so the loss's B×B logits never exist and the towers' activations are what grows), plain and
with `train.micro_batch_size` (gradient caching), each in a fresh subprocess under the same
allocator. Peak memory is the
growth of the process's resident set over the step: VmHWM after resetting it (/proc/self/
clear_refs) minus VmRSS before, on the first step after the build (the first, so that no memory
an earlier step freed but the allocator kept counts as already there; it includes the
optimizer's state, 1.3 MB for this model). That is what the OS sees, allocator caching and
fragmentation included; torch keeps no peak statistics for CPU tensors, and tracemalloc does not
see torch's allocations (Linux only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, get_args

from scalestudy.allocator import Allocator
from scalestudy.executors.process import trial_env
from scalestudy.expand import derive, trial_id
from scalestudy.spec import TrialConfig
from scalestudy.store import RunStore, Trial

TINY = {"width": 32, "depth": 1, "heads": 2, "embed_dim": 32}
WARMUP = 20


def step_times(root: Path, name: str, steps: int, threads: int, malloc: str,
               **config: Any) -> tuple[list[float], str]:
    """The step times after warm-up of a trial run as the executors run one (its own process,
    `threads` torch threads, the allocator `malloc` preloaded), and the allocator it recorded."""
    values = {"train": {"eval_every": 0, "checkpoint_every": 0}, "data": {"eval_images": 64},
              "resources": {"cpus": threads, "allocator": malloc}}
    for section, keys in config.items():
        values.setdefault(section, {}).update(keys)
    values["train"]["examples_seen"] = values["train"]["batch_size"] * (steps + WARMUP)
    cfg = TrialConfig.model_validate(values)
    trial = Trial(trial_id=trial_id(cfg), config=cfg, derived=derive(cfg), swept={})
    store = RunStore(root / name)
    ts = store.add_trial(trial)
    env = trial_env(os.environ, threads, None, cfg.resources.allocator)
    subprocess.run([sys.executable, "-m", "scalestudy.trial", str(ts.path)], env=env, check=True)
    return ts.metrics()["step_time_s"].to_list()[WARMUP:], ts.state().allocator or "?"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def step_memory(batch: int, micro: int | None, threads: int) -> dict[str, float]:
    """Peak RSS growth (MiB) and wall seconds of the first step of a B = `batch` trial."""
    import torch

    from scalestudy.train.loop import Trainer
    from scalestudy.train.ranks import Ranks

    torch.set_num_threads(threads)
    cfg = TrialConfig.model_validate({
        "model": TINY, "loss": {"kind": "sigmoid", "chunk_size": 1024},
        "train": {"batch_size": batch, "examples_seen": 2 * batch, "micro_batch_size": micro},
        "data": {"eval_images": 64}, "monitor": {"extended": True}})
    trial = Trial(trial_id=trial_id(cfg), config=cfg, derived=derive(cfg), swept={})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer.build(trial, Ranks(), torch.device("cpu"), Path(tmp))
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        trainer.step(1)
        seconds = time.perf_counter() - start
    return {"peak_mib": (_status_kib("VmHWM") - before) / 1024, "seconds": seconds}


def memory_table(batch: int, micros: list[int], threads: int, malloc: str) -> None:
    print(f"tiny model, B={batch}, sigmoid chunked by 1024, threads {threads}, allocator {malloc}")
    print("| micro-batch | peak RSS growth over the step (MiB) | step (s) |")
    print("|---|---:|---:|")
    for micro in [None, *micros]:
        command = [sys.executable, __file__, "--memory-case", str(micro or 0), "--batch", str(batch),
                   "--threads", str(threads)]
        done = subprocess.run(command, check=True, capture_output=True, text=True,
                              env=trial_env(os.environ, threads, None, malloc))
        result = json.loads(done.stdout.splitlines()[-1])
        print(f"| {micro or 'none (whole batch)'} | {result['peak_mib']:.0f} | {result['seconds']:.1f} |",
              flush=True)


CASES = {
    "tiny model, B=16, monitors on": dict(model=TINY, train={"batch_size": 16}),
    "tiny model, B=16, monitors off": dict(model=TINY, train={"batch_size": 16},
                                           monitor={"extended": False}),
    "tiny model, B=16, monitors on, train.compile": dict(model=TINY,
                                                         train={"batch_size": 16, "compile": True}),
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
    parser.add_argument("--memory", action="store_true",
                        help="peak memory of one step at --batch, plain and micro-batched")
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--micro", type=int, nargs="+", default=[1024])
    parser.add_argument("--allocator", default="auto", choices=get_args(Allocator),
                        help="the trials' resources.allocator (default auto, as trials have it)")
    parser.add_argument("--memory-case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case is not None:
        print(json.dumps(step_memory(args.batch, args.memory_case or None, args.threads)))
        return
    if args.memory:
        memory_table(args.batch, args.micro, args.threads, args.allocator)
        return
    print(f"load average {os.getloadavg()[0]:.2f}, torch threads {args.threads}, "
          f"resources.allocator={args.allocator}")
    print("| case | median step (ms) | mean step (ms) | p90 (ms) | samples/s (from the mean) | malloc |")
    print("|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, config) in enumerate(CASES.items()):
            if args.only and args.only not in name:
                continue
            steps = args.steps if "B=16" in name else max(30, args.steps // 10)
            times, malloc = step_times(Path(tmp), f"case{i}", steps, args.threads, args.allocator,
                                       **config)
            median, mean = statistics.median(times), statistics.fmean(times)
            p90 = statistics.quantiles(times, n=10)[-1]
            batch = config["train"]["batch_size"]
            print(f"| {name} | {1000 * median:.2f} | {1000 * mean:.2f} | {1000 * p90:.2f} | "
                  f"{batch / mean:.0f} | {malloc} |", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Does data loading bound a CPU step? The loader's share of the quickstart model's step at batch 256.

For each data source — the built-in shapes; a WebDataset shard and a CSV of 32 px images (as
img2dataset writes them for a 32 px study); a shard of 256 px JPEGs resized on the fly — it runs a
real trial of the quickstart model (the default model, all monitors on, batch 256) in this process
through the trial entry point (`scalestudy.train.loop.run_trial`), with the trial's dataset wrapped
so every `train_batch` call the loop makes is timed. Each step's loader time is paired with the same
step's `step_time_s` (which includes it), so both see the same load on this shared machine; the
table gives medians over steps. It also gives the time to build one batch alone (back-to-back
calls), which real data hides behind the step by decoding the next batch in a background thread.
The target (issue 3): loader time per step < 10% of the step.

    .venv/bin/python benchmarks/bench_data.py [--steps 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import scalestudy.train.loop as loop
from scalestudy.expand import expand
from scalestudy.load import validate_study
from scalestudy.spec import DataSpec
from scalestudy.store import RunStore
from scalestudy.train.data import Batch, Dataset
from scalestudy.train.datasets import make_dataset

BATCH = 256
SAMPLES = 2048


def photo_like(rng: np.random.Generator, side: int) -> Image.Image:
    """A smooth random colour field with a little grain: compresses like a small photo."""
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def write_shard(path: Path, side: int, rng: np.random.Generator) -> Path:
    with tarfile.open(path, "w") as tar:
        for i in range(SAMPLES):
            jpeg = io.BytesIO()
            photo_like(rng, side).save(jpeg, "JPEG", quality=90)
            for name, payload in ((f"{i:07d}.jpg", jpeg.getvalue()),
                                  (f"{i:07d}.txt", f"a photo of thing {i % 97}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def write_csv(folder: Path, rng: np.random.Generator) -> Path:
    (folder / "images").mkdir()
    path = folder / "pairs.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in range(SAMPLES):
            photo_like(rng, 32).save(folder / "images" / f"{i}.png")
            writer.writerow([f"images/{i}.png", f"a photo of thing {i % 97}"])
    return path


def write_classes(folder: Path, rng: np.random.Generator) -> Path:
    """A zero-shot folder of two classes, so real-data trials evaluate as a study would."""
    for name in ("warm_things", "cold_things"):
        (folder / name).mkdir(parents=True)
        for i in range(8):
            photo_like(rng, 32).save(folder / name / f"{i}.png")
    return folder


class TimedDataset:
    """The trial's dataset, with the wall time of every train_batch call the loop makes."""

    def __init__(self, inner: Dataset) -> None:
        self.inner, self.waits = inner, {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def train_batch(self, step: int, batch_size: int, rows: slice = slice(None)) -> Batch:
        start = time.perf_counter()
        batch = self.inner.train_batch(step, batch_size, rows)
        self.waits[step] = time.perf_counter() - start
        return batch


def build_ms(data: dict[str, Any], steps: int) -> float:
    """Median time of back-to-back train_batch calls: one batch built with nothing to hide behind."""
    dataset = make_dataset(DataSpec(**data), seed=0)
    dataset.train_batch(1, BATCH)  # the first call also starts the prefetch
    times = []
    for step in range(2, steps + 2):
        start = time.perf_counter()
        dataset.train_batch(step, BATCH)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def in_loop(data: dict[str, Any], steps: int, threads: int, out: Path) -> dict[str, float]:
    """Median loader wait, step time and their ratio over the steps of one real trial."""
    study = validate_study({
        "name": out.name,
        "base": {
            "data": data,
            "train": {"batch_size": BATCH, "examples_seen": BATCH * steps, "eval_every": 0,
                      "checkpoint_every": 0},
            "resources": {"cpus": threads},
        },
    }, "bench")
    (trial,) = expand(study)
    store = RunStore(out).add_trial(trial)
    timed: list[TimedDataset] = []

    def make_timed(spec: DataSpec, seed: int) -> TimedDataset:
        timed.append(TimedDataset(make_dataset(spec, seed)))
        return timed[-1]

    loop.make_dataset = make_timed
    try:
        loop.run_trial(str(store.path))
    finally:
        loop.make_dataset = make_dataset
    step_times = dict(zip(store.metrics()["step"].to_list(), store.metrics()["step_time_s"].to_list()))
    waits = timed[0].waits
    paired = [(waits[s], step_times[s]) for s in sorted(waits) if s > 1]  # step 1 warms up
    return {
        "wait_ms": 1000 * statistics.median(w for w, _ in paired),
        "step_ms": 1000 * statistics.median(t for _, t in paired),
        "share": statistics.median(w / t for w, t in paired),
    }


def run(steps: int, threads: int) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        zeroshot = {"zeroshot_dir": str(write_classes(root / "classes", rng))}
        sources = {
            "shapes (rendered, 32 px)": {"kind": "shapes"},
            "WebDataset, 32 px JPEG": {"kind": "webdataset", **zeroshot,
                                       "shards": str(write_shard(root / "small.tar", 32, rng))},
            "CSV, 32 px PNG files": {"kind": "csv", "csv": str(write_csv(root, rng)), **zeroshot},
            "WebDataset, 256 px JPEG → 32": {"kind": "webdataset", **zeroshot,
                                             "shards": str(write_shard(root / "large.tar", 256, rng))},
        }
        for i, (label, data) in enumerate(sources.items()):
            figures = in_loop(data, steps, threads, root / "runs" / f"source{i}")
            rows.append({"source": label, "build_ms": build_ms(data, steps), **figures})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="trial steps (and timed batches) per source")
    parser.add_argument("--threads", type=int, default=2, help="torch threads: the quickstart's resources.cpus")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = run(args.steps, args.threads)
    print(f"batch {BATCH}, {args.threads} torch threads, medians over {args.steps - 1} steps; "
          f"{os.cpu_count()} cores, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| data source | build one batch, ms | loader wait in the loop, ms | step, ms | loader share |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['source']} | {row['build_ms']:.1f} | {row['wait_ms']:.1f} | {row['step_ms']:.0f} "
              f"| {100 * row['share']:.1f}% |")


if __name__ == "__main__":
    main()

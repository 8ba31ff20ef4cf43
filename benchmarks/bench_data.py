"""Does data loading bound a step? The loader's share of the quickstart model's step at batch 256,
with batches built in the trial's process (data.workers=0) or in worker processes; and what indexing
many shards costs, once and from the cache.

1. In the loop. For each data source — the built-in shapes (32 px), and 8 WebDataset shards of 256 px
   JPEGs decoded and resized to 32 px on the fly — and each worker count, a real trial of the
   quickstart model (the default model, all monitors on, batch 256) runs in this process through
   the trial entry point (`scalestudy.train.loop.run_trial`). Its batches come from
   `scalestudy.train.loader.train_batches`, and the time the loop waits for each is paired with
   the same step's `step_time_s` (which includes it), so both see the same load on this shared
   machine; medians over the steps after the first. Target (issue "A trial engine fit for a GPU
   cluster"): loader wait < 10 % of the step.
2. Alone. 4 × steps back-to-back batches from `train_batches` with nothing to hide behind: the
   rate the loader delivers at, ms per batch over the second half.
3. The index. N shards of 1,000 pairs each: indexing them with the header-only reader in 1 and in
   2 processes, listing them through `tarfile` (the eager index did that and more), and a start-up
   that finds the index in the cache.

    .venv/bin/python benchmarks/bench_data.py [--steps 12] [--threads 2] [--workers 2] [--shards 100]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from scalestudy.expand import expand
from scalestudy.load import validate_study
from scalestudy.spec import DataSpec
from scalestudy.store import RunStore
from scalestudy.train import loop
from scalestudy.train.data import Batch, Dataset
from scalestudy.train.datasets import make_dataset
from scalestudy.train.loader import train_batches
from scalestudy.train.realdata import ImageReader, build_index, cached_index

BATCH = 256
SHARDS, PER_SHARD = 8, 256


def photo_like(rng: np.random.Generator, side: int) -> Image.Image:
    """A smooth random colour field with a little grain: compresses like a small photo."""
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def write_tar(path: Path, members: Iterator[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def jpeg_members(first: int, count: int, side: int, rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    for i in range(first, first + count):
        jpeg = io.BytesIO()
        photo_like(rng, side).save(jpeg, "JPEG", quality=90)
        yield f"{i:09d}.jpg", jpeg.getvalue()
        yield f"{i:09d}.txt", f"a photo of thing {i % 97}".encode()


def write_classes(folder: Path, rng: np.random.Generator) -> Path:
    """A zero-shot folder of two classes, so real-data trials evaluate as a study would."""
    for name in ("warm_things", "cold_things"):
        (folder / name).mkdir(parents=True)
        for i in range(8):
            photo_like(rng, 32).save(folder / name / f"{i}.png")
    return folder


class LoaderFed:
    """The trial's dataset, its training batches drawn from `train_batches` (the loop asks for
    step s as `train_batch(s, …)`), each wait for one timed."""

    def __init__(self, inner: Dataset, end: int, workers: int) -> None:
        self.inner, self.end, self.workers = inner, end, workers
        self.batches: Iterator[tuple[int, Batch]] | None = None
        self.waits: dict[int, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def train_batch(self, step: int, batch_size: int, rows: slice = slice(None)) -> Batch:
        start = time.perf_counter()
        if self.batches is None:
            self.batches = train_batches(self.inner, batch_size, rows, step - 1, self.end, self.workers)
        got, batch = next(self.batches)
        assert got == step, (got, step)
        self.waits[step] = time.perf_counter() - start
        return batch


def in_loop(data: dict[str, Any], steps: int, threads: int, workers: int, out: Path) -> dict[str, float]:
    """Median loader wait, step time and their ratio over the steps of one real trial."""
    study = validate_study({
        "name": out.name,
        "base": {
            "data": {**data, "workers": workers},
            "train": {"batch_size": BATCH, "examples_seen": BATCH * steps, "eval_every": 0,
                      "checkpoint_every": 0},
            "resources": {"cpus": threads},
        },
    }, "bench")
    (trial,) = expand(study)
    store = RunStore(out).add_trial(trial)
    fed: list[LoaderFed] = []

    def make_fed(spec: DataSpec, seed: int) -> LoaderFed:
        fed.append(LoaderFed(make_dataset(spec, seed), steps, workers))
        return fed[-1]

    loop.make_dataset = make_fed
    try:
        loop.run_trial(str(store.path))
    finally:
        loop.make_dataset = make_dataset
    metrics = store.metrics()
    step_times = dict(zip(metrics["step"].to_list(), metrics["step_time_s"].to_list()))
    waits = fed[0].waits
    paired = [(waits[s], step_times[s]) for s in sorted(waits) if s > 1]  # step 1 starts up
    return {
        "wait_ms": 1000 * statistics.median(w for w, _ in paired),
        "step_ms": 1000 * statistics.median(t for _, t in paired),
        "share": statistics.median(w / t for w, t in paired),
    }


def alone_ms(data: dict[str, Any], steps: int, workers: int) -> float:
    """Milliseconds a batch over the second half of `steps` back-to-back batches: by then the
    batches the workers built ahead while the first was awaited are used up, so this is the rate
    they build at."""
    dataset = make_dataset(DataSpec(**data, workers=workers), seed=0)
    arrived = [time.perf_counter() for _ in train_batches(dataset, BATCH, slice(None), 0, steps, workers)]
    half = steps // 2
    return 1000 * (arrived[-1] - arrived[half - 1]) / (steps - half)


def index_figures(root: Path, shards: int) -> dict[str, float]:
    """Seconds to index `shards` shards of 1,000 pairs (2 KB images: both readers seek past them) in
    several ways."""
    folder = root / "index"
    folder.mkdir()
    payload = os.urandom(2_000)
    for shard in range(shards):
        write_tar(folder / f"{shard:05d}.tar", (
            (f"{shard:05d}{i:04d}.{ext}", payload if ext == "jpg" else f"caption {i}".encode())
            for i in range(1000) for ext in ("jpg", "txt")))
    paths = sorted(str(p) for p in folder.iterdir())
    figures = {}
    for processes in (1, 2):
        started = time.perf_counter()
        index = build_index("webdataset", paths, ImageReader(32), processes=processes)
        figures[f"header reader, {processes} process{'es' if processes > 1 else ''}"] = time.perf_counter() - started
        assert len(index) == shards * 1000
    started = time.perf_counter()
    for path in paths:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    tar.extractfile(member).read()
    figures["tarfile listing alone, 1 process (less than the eager index did)"] = time.perf_counter() - started
    cache = root / "cache"
    cached_index("webdataset", paths, ImageReader(32), cache, processes=2)
    started = time.perf_counter()
    assert len(cached_index("webdataset", paths, ImageReader(32), cache)) == shards * 1000
    figures["start-up with the index in the cache"] = time.perf_counter() - started
    return figures


def run(steps: int, threads: int, workers: int, shards: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    loop_rows, alone_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "jpeg").mkdir()
        for shard in range(SHARDS):
            write_tar(root / "jpeg" / f"{shard:03d}.tar", jpeg_members(shard * PER_SHARD, PER_SHARD, 256, rng))
        sources = {
            "shapes (rendered, 32 px)": {"kind": "shapes"},
            f"WebDataset, {SHARDS} shards of 256 px JPEG → 32": {
                "kind": "webdataset", "shards": str(root / "jpeg" / f"{{000..{SHARDS - 1:03d}}}.tar"),
                "zeroshot_dir": str(write_classes(root / "classes", rng))},
        }
        for i, (label, data) in enumerate(sources.items()):
            for count in (0, workers):
                load = os.getloadavg()[0]
                figures = in_loop(data, steps, threads, count, root / "runs" / f"source{i}-{count}")
                loop_rows.append({"source": label, "workers": count, "load": load, **figures})
                alone_rows.append({"source": label, "workers": count, "ms": alone_ms(data, 4 * steps, count)})
        index = index_figures(root, shards)
    return {"loop": loop_rows, "alone": alone_rows, "index": index}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="trial steps (and timed batches) per run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads: the quickstart's resources.cpus")
    parser.add_argument("--workers", type=int, default=2, help="data.workers compared with 0")
    parser.add_argument("--shards", type=int, default=100, help="shards of 1,000 pairs to index")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    results = run(args.steps, args.threads, args.workers, args.shards)
    print(f"batch {BATCH}, {args.threads} torch threads, medians over {args.steps - 1} steps; "
          f"{os.cpu_count()} cores, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| data source | data.workers | load avg | loader wait in the loop, ms | step, ms | loader share |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in results["loop"]:
        print(f"| {row['source']} | {row['workers']} | {row['load']:.1f} | {row['wait_ms']:.1f} "
              f"| {row['step_ms']:.0f} | {100 * row['share']:.1f}% |")
    print("\n| data source | data.workers | loader alone, ms per batch |")
    print("|---|---:|---:|")
    for row in results["alone"]:
        print(f"| {row['source']} | {row['workers']} | {row['ms']:.1f} |")
    print(f"\n| index {args.shards} shards × 1,000 pairs | seconds |")
    print("|---|---:|")
    for what, seconds in results["index"].items():
        print(f"| {what} | {seconds:.2f} |")


if __name__ == "__main__":
    main()

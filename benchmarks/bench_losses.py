"""Time and peak memory of the losses, forward + backward, at a large batch.

    .venv/bin/python benchmarks/bench_losses.py --batch 16384 --dim 256 --threads 2 \
        --repeats 3 --chunks 1024 2048 4096

prints a Markdown table for benchmarks/README.md (## Losses). Every variant runs in a fresh
subprocess (this script with ``--only``), so its peak memory is its own: the growth of the
process's resident set (VmHWM, reset through /proc/self/clear_refs, minus VmRSS before the first
run; Linux only) over one warm-up and ``--repeats`` timed runs. Times are medians of the timed
runs, wall clock and process CPU time (all threads); on a shared machine the CPU time is the
steadier of the two. The roofline is the three bare B×D×B matrix products any of these losses needs: the
forward logits X Yᵀ and the two backward products G Y and Gᵀ X.

``--duplicates positive|masked`` times the losses with every caption appearing twice in the batch
(``groups = arange(B) // 2``); the default, negative, is the papers' loss.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scalestudy.losses import sigmoid_loss, softmax_loss  # noqa: E402

Step = Callable[[torch.Tensor, torch.Tensor], None]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _roofline(x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.no_grad():
        g = x @ y.t()
        g @ y
        g.t() @ x


def _loss_step(loss: Callable[..., torch.Tensor], chunk: int | None, duplicates: str) -> Step:
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        image, text = x.detach().requires_grad_(), y.detach().requires_grad_()
        scale = torch.tensor(10.0, requires_grad=True)
        options = {} if duplicates == "negative" else {
            "groups": torch.arange(x.shape[0]) // 2, "duplicates": duplicates}
        if loss is sigmoid_loss:
            loss(image, text, scale, torch.tensor(-10.0, requires_grad=True), chunk, **options).backward()
        else:
            loss(image, text, scale, chunk, **options).backward()

    return step


def _step(name: str, chunk: int | None, duplicates: str) -> Step:
    if name == "roofline":
        return _roofline
    return _loss_step(sigmoid_loss if name == "sigmoid" else softmax_loss, chunk, duplicates)


def measure(name: str, chunk: int | None, batch: int, dim: int, repeats: int,
            duplicates: str = "negative") -> dict[str, float]:
    """Median wall and CPU seconds, and peak RSS growth (MiB), of one variant in this process."""
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    y = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    step = _step(name, chunk, duplicates)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    wall, cpu = [], []
    for _ in range(repeats + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        step(x, y)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"seconds": statistics.median(wall[1:]), "cpu_seconds": statistics.median(cpu[1:]),
            "peak_mib": (_status_kib("VmHWM") - before) / 1024}


def _in_subprocess(args: argparse.Namespace, name: str, chunk: int | None) -> dict[str, float]:
    command = [sys.executable, __file__, "--only", name, "--batch", str(args.batch), "--dim",
               str(args.dim), "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--duplicates", args.duplicates]
    if chunk is not None:
        command += ["--chunk", str(chunk)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def _rows(args: argparse.Namespace) -> Iterator[str]:
    """The table's lines, each as soon as its variant is measured (the naive ones come first)."""
    variants: list[tuple[str, str, int | None]] = [("roofline", "3 bare B×D×B products", None)]
    for loss in ("sigmoid", "softmax"):
        variants.append((loss, f"{loss} naive", None))
        variants += [(loss, f"{loss} {'chunked' if loss == 'sigmoid' else 'streaming'} c={c}", c)
                     for c in args.chunks]
    yield ("| variant | wall (s) | × roofline | CPU (s) | × roofline | peak RSS growth (MiB) "
           "| ÷ naive peak |")
    yield "|---|---:|---:|---:|---:|---:|---:|"
    results: dict[str, dict[str, float]] = {}
    for name, label, chunk in variants:
        r = results[label] = _in_subprocess(args, name, chunk)
        roofline = results["3 bare B×D×B products"]
        naive = results.get(f"{name} naive", r)["peak_mib"]
        ratio = "" if name == "roofline" else f"{naive / r['peak_mib']:.1f}"
        yield (f"| {label} | {r['seconds']:.2f} | {r['seconds'] / roofline['seconds']:.2f} "
               f"| {r['cpu_seconds']:.2f} | {r['cpu_seconds'] / roofline['cpu_seconds']:.2f} "
               f"| {r['peak_mib']:.0f} | {ratio} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--chunks", type=int, nargs="+", default=[2048])
    parser.add_argument("--duplicates", choices=["negative", "positive", "masked"], default="negative",
                        help="positive or masked: time the losses with every caption twice in the batch")
    parser.add_argument("--only", choices=["roofline", "sigmoid", "softmax"], help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(measure(args.only, args.chunk, args.batch, args.dim, args.repeats, args.duplicates)))
        return
    print(f"B={args.batch} D={args.dim} threads={args.threads} repeats={args.repeats} "
          f"duplicates={args.duplicates} "
          f"torch={torch.__version__} cpu={platform.processor() or platform.machine()}\n", flush=True)
    for row in _rows(args):
        print(row, flush=True)


if __name__ == "__main__":
    main()

"""The GPU checks of the trial engine, one part per call; benchmarks/device_check.sh runs them all.

    python benchmarks/device_check.py PART --out DIR [--cpu-dry-run]

Parts (each writes DIR/PART.json: {"part", "ok", "seconds", "device", "result" | "error"}):

- resume: a trial on CUDA killed with SIGKILL mid-run and run again, against an uninterrupted run,
  and against a second uninterrupted run (how far CUDA's own run-to-run nondeterminism goes).
- precision: fp32, tf32 and bf16 step time, samples/s, achieved TFLOP/s, MFU and peak memory for
  a ViT-B/16 tower pair (model.preset ViT-B-16 at 224 px) through the real Trainer.step, data
  rendering excluded (one rendered batch is reused), monitors on.
- losses: chunked vs naive sigmoid and softmax, forward + backward, at B = 16,384 and 65,536
  (D = 512): CUDA-event time and peak allocated memory (an out-of-memory is a result).
- syncs: torch.cuda.set_sync_debug_mode("warn") over 40 Trainer steps with every monitor on and
  a flush every 10 steps (plain, and fp16 with micro-batching): the synchronising calls, counted.
- monitors: step time with monitor.extended on and off (the tiny canonical model and ViT-B/16).
- distributed: the distributed losses in a world-size-1 NCCL group against the single-process
  losses: values and gradients.

`--cpu-dry-run` runs every part tiny on the CPU (gloo instead of NCCL; no sync debug mode there):
it proves the script's code paths, not the GPU's numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scalestudy.expand import derive, trial_id
from scalestudy.spec import TrialConfig
from scalestudy.store import RunStore, Trial

TINY_MODEL = {"width": 32, "depth": 1, "heads": 2, "embed_dim": 32}


def as_trial(values: dict[str, Any]) -> Trial:
    cfg = TrialConfig.model_validate(values)
    return Trial(trial_id=trial_id(cfg), config=cfg, derived=derive(cfg), swept={})


def on_device(values: dict[str, Any], dry: bool) -> dict[str, Any]:
    """`values` with the trial on the GPU (or, dry, on the CPU)."""
    values = {section: dict(keys) for section, keys in values.items()}
    values.setdefault("resources", {}).update({"gpus": 0, "cpus": 2} if dry else {"gpus": 1, "cpus": 8})
    values.setdefault("train", {})["device"] = "cpu" if dry else "cuda"
    return values


class Timer:
    """Wall and (on CUDA) event time of a block of work, synchronised at its end."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            torch.cuda.synchronize()
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
            self.device_s = self.start_event.elapsed_time(end) / 1000
        self.wall_s = time.perf_counter() - self.start
        if not self.cuda:
            self.device_s = self.wall_s


# --- resume -----------------------------------------------------------------------------------


def trial_process(trial_dir: Path) -> subprocess.Popen[bytes]:
    """`python -m scalestudy.trial`, its output appended to the trial's log.txt (a pipe nobody
    reads could fill and stall it)."""
    with open(trial_dir / "log.txt", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "scalestudy.trial", str(trial_dir)],
                                stdout=log, stderr=subprocess.STDOUT)


def finished(proc: subprocess.Popen[bytes], trial_dir: Path, timeout: float) -> None:
    if proc.wait(timeout=timeout) != 0:
        raise RuntimeError(f"trial exited {proc.returncode}:\n{(trial_dir / 'log.txt').read_text()[-3000:]}")


def recorded_step(trial_dir: Path) -> int:
    try:
        return int(json.loads((trial_dir / "state.json").read_text()).get("step") or 0)
    except (OSError, ValueError):
        return 0


def part_resume(device: torch.device, dry: bool) -> dict[str, Any]:
    import polars as pl

    steps, batch = (40, 32) if dry else (240, 128)
    trial = as_trial(on_device({
        "model": TINY_MODEL, "data": {"eval_images": 64 if dry else 256},
        "train": {"batch_size": batch, "examples_seen": batch * steps, "checkpoint_every": 25,
                  "eval_every": 50},
        "loss": {"kind": "sigmoid"}}, dry))
    root = Path(tempfile.mkdtemp(prefix="resume-"))
    runs = {name: RunStore(root / name).add_trial(trial) for name in ("straight", "again", "killed")}
    for name in ("straight", "again"):
        finished(trial_process(runs[name].path), runs[name].path, 120)
    proc = trial_process(runs["killed"].path)
    kill_after = steps // 2
    deadline = time.time() + 90
    while recorded_step(runs["killed"].path) < kill_after:
        assert proc.poll() is None, "the trial ended before it could be killed"
        assert time.time() < deadline, f"no step {kill_after} within 90 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = recorded_step(runs["killed"].path)
    finished(trial_process(runs["killed"].path), runs["killed"].path, 120)

    timing = ("step_time_s", "device_step_time_s", "peak_memory_gib")
    frames = {name: ts.metrics().drop([c for c in timing if c in ts.metrics().columns])
              for name, ts in runs.items()}

    def largest_gap(a: pl.DataFrame, b: pl.DataFrame) -> float:
        gaps = [float(((a[c] - b[c]).abs() / b[c].abs().clip(lower_bound=1e-12)).max() or 0.0)
                for c in ("loss", "grad_norm", "temperature", "bias")]
        return max(gaps)

    straight = frames["straight"]
    return {
        "steps": steps, "killed_at_recorded_step": killed_at,
        "attempts": json.loads((runs["killed"].path / "state.json").read_text())["attempts"],
        "resumed_steps_complete": frames["killed"]["step"].to_list() == list(range(1, steps + 1)),
        "resumed_equals_straight_exactly": frames["killed"].equals(straight),
        "rerun_equals_straight_exactly": frames["again"].equals(straight),
        "max_rel_gap_resumed_vs_straight": largest_gap(frames["killed"], straight),
        "max_rel_gap_rerun_vs_straight": largest_gap(frames["again"], straight),
        "evals_equal": runs["killed"].evals().equals(runs["straight"].evals()),
    }


# --- precision and monitors: the real Trainer.step on one reused batch -------------------------


def trainer_for(values: dict[str, Any], device: torch.device) -> Any:
    """A Trainer whose dataset hands out one rendered batch for every step (rendering at 224 px on
    the host would otherwise be what is measured)."""
    from scalestudy.train.loop import Trainer
    from scalestudy.train.ranks import Ranks

    trial = as_trial(values)
    trainer = Trainer.build(trial, Ranks(), device, Path(tempfile.mkdtemp(prefix="trainer-")))
    trainer.dataset = OneBatch(trainer.dataset, trainer.dataset.train_batch(
        1, trial.config.train.batch_size, trainer.local))
    return trainer


class OneBatch:
    """A dataset that answers every training step with the same batch (and is otherwise `dataset`)."""

    def __init__(self, dataset: Any, batch: Any) -> None:
        self._dataset, self._batch = dataset, batch

    def train_batch(self, step: int, batch_size: int, rows: slice = slice(None), **_: Any) -> Any:
        return self._batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dataset, name)


def time_steps(trainer: Any, warmup: int, steps: int) -> dict[str, float]:
    """Median-free totals: `steps` steps after `warmup`, rows drained at the end (one sync)."""
    rows = trainer.rows()
    for step in range(1, warmup + 1):
        rows.append(*trainer.step(step))
    rows.drain()
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    with Timer(trainer.device) as timer:
        for step in range(warmup + 1, warmup + steps + 1):
            rows.append(*trainer.step(step))
        losses = [row["loss"] for row in rows.drain()]
    return {"step_s": timer.wall_s / steps, "device_step_s": timer.device_s / steps,
            "last_loss": losses[-1], "finite": all(math.isfinite(v) for v in losses)}


def vit_b16(dry: bool, batch: int, **train: Any) -> dict[str, Any]:
    if dry:
        return {"model": TINY_MODEL, "train": {"batch_size": 16, "examples_seen": 16 * 100, **train},
                "data": {"eval_images": 64}}
    return {"model": {"preset": "ViT-B-16"}, "data": {"image_size": 224, "eval_images": 64},
            "train": {"batch_size": batch, "examples_seen": batch * 100, **train},
            "loss": {"kind": "sigmoid"}}


def part_precision(device: torch.device, dry: bool) -> dict[str, Any]:
    from scalestudy.train.throughput import peak_flops, training_flops_per_sample

    batch, warmup, steps = (16, 2, 5) if dry else (128, 3, 12)
    results: dict[str, Any] = {}
    for mode in ("fp32", "tf32", "bf16"):
        values = on_device(vit_b16(dry, batch, precision=mode), dry)
        trainer = trainer_for(values, device)
        timing = time_steps(trainer, warmup, steps)
        cfg = trainer.trial.config
        flops = training_flops_per_sample(cfg) * cfg.train.batch_size
        peak = peak_flops(device, mode, None)
        results[mode] = {
            **timing, "samples_per_s": cfg.train.batch_size / timing["step_s"],
            "achieved_tflops": flops / timing["step_s"] / 1e12,
            "mfu": None if peak is None else flops / timing["step_s"] / peak,
            "mfu_device_time": None if peak is None else flops / timing["device_step_s"] / peak,
            "peak_tflops": None if peak is None else peak / 1e12,
            "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                if device.type == "cuda" else None),
        }
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["model_tflops_per_step"] = flops / 1e12
    results["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return results


def part_monitors(device: torch.device, dry: bool) -> dict[str, Any]:
    cases = {"tiny model, B=256": ({"model": TINY_MODEL, "data": {"eval_images": 64},
                                    "train": {"batch_size": 256, "examples_seen": 256 * 400}}, 100),
             "ViT-B/16 bf16, B=64": (vit_b16(dry, 64, precision="bf16"), 15)}
    results: dict[str, Any] = {}
    for name, (values, steps) in cases.items():
        if dry:
            steps = 5
        for extended in (True, False):
            trainer = trainer_for(on_device({**values, "monitor": {"extended": extended}}, dry), device)
            timing = time_steps(trainer, 3, steps)
            results[f"{name}, monitors {'on' if extended else 'off'}"] = timing
            del trainer
        on, off = (results[f"{name}, monitors {state}"]["step_s"] for state in ("on", "off"))
        results[f"{name}, overhead"] = on / off - 1
    return results


# --- losses -----------------------------------------------------------------------------------


def part_losses(device: torch.device, dry: bool) -> dict[str, Any]:
    from scalestudy.losses import sigmoid_loss, softmax_loss

    dim, chunk = (64, 256) if dry else (512, 4096)
    batches = (1024, 2048) if dry else (16384, 65536)
    results: dict[str, Any] = {}
    for batch in batches:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.nn.functional.normalize(torch.randn(batch, dim, device=device, generator=g), dim=1)
        y = torch.nn.functional.normalize(torch.randn(batch, dim, device=device, generator=g), dim=1)
        for name, size in (("sigmoid naive", None), ("sigmoid chunked", chunk),
                           ("softmax naive", None), ("softmax streaming", chunk)):
            key = f"B={batch} {name}" + (f" c={size}" if size else "")

            def run(x: torch.Tensor = x, y: torch.Tensor = y, name: str = name,
                    size: int | None = size) -> float:
                image, text = x.detach().requires_grad_(), y.detach().requires_grad_()
                scale = torch.tensor(10.0, device=device, requires_grad=True)
                if name.startswith("sigmoid"):
                    bias = torch.tensor(-10.0, device=device, requires_grad=True)
                    loss = sigmoid_loss(image, text, scale, bias, size)
                else:
                    loss = softmax_loss(image, text, scale, size)
                loss.backward()
                return float(loss.detach())

            try:
                run()  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                times = []
                for _ in range(3):
                    with Timer(device) as timer:
                        value = run()
                    times.append(timer.device_s)
                results[key] = {"seconds": statistics.median(times), "loss": value,
                                "peak_gib": ((torch.cuda.max_memory_allocated(device) - base) / 2**30
                                             if device.type == "cuda" else None)}
            except torch.OutOfMemoryError as oom:
                results[key] = {"out_of_memory": str(oom).splitlines()[0]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


# --- syncs ------------------------------------------------------------------------------------


def part_syncs(device: torch.device, dry: bool) -> dict[str, Any]:
    batch = 32 if dry else 256  # fp16 matmuls on a CPU are slow
    cases = {"plain": {}, "fp16 micro-batched clipped": {
        "train": {"precision": "fp16", "micro_batch_size": batch // 4}, "optim": {"grad_clip": 1.0}}}
    results: dict[str, Any] = {}
    for name, options in cases.items():
        values = {"model": TINY_MODEL, "data": {"eval_images": 64},
                  "train": {"batch_size": batch, "examples_seen": batch * 100, **options.get("train", {})},
                  "optim": options.get("optim", {})}
        trainer = trainer_for(on_device(values, dry), device)
        rows = trainer.rows()
        rows.append(*trainer.step(1))  # the optimizer's state is made on the first step
        rows.drain()
        flushes = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                for step in range(2, 42):
                    rows.append(*trainer.step(step))
                    if step % 10 == 1:
                        rows.drain()
                        flushes += 1
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        places: dict[str, int] = {}
        for w in syncs:
            place = f"{w.filename}:{w.lineno}"
            places[place] = places.get(place, 0) + 1
        results[name] = {"steps": 40, "flushes": flushes,
                         "syncs": len(syncs) if device.type == "cuda" else None,
                         "syncs_per_step": len(syncs) / 40 if device.type == "cuda" else None,
                         "where": places}
    return results


# --- distributed ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def part_distributed(device: torch.device, dry: bool) -> dict[str, Any]:
    import torch.distributed as dist

    from scalestudy.distributed_losses import (
        distributed_sigmoid_loss,
        distributed_softmax_loss,
    )
    from scalestudy.losses import sigmoid_loss, softmax_loss

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if dry else "nccl", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    try:
        batch, dim = (256, 32) if dry else (4096, 512)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.nn.functional.normalize(torch.randn(batch, dim, device=device, generator=g), dim=1)
        y = torch.nn.functional.normalize(torch.randn(batch, dim, device=device, generator=g), dim=1)
        results: dict[str, Any] = {}
        for name, chunk in (("sigmoid", None), ("sigmoid", 512), ("softmax", None), ("softmax", 512)):
            outcome = []
            for loss_fn in ((distributed_sigmoid_loss, sigmoid_loss) if name == "sigmoid"
                            else (distributed_softmax_loss, softmax_loss)):
                image, text = x.clone().requires_grad_(), y.clone().requires_grad_()
                scale = torch.tensor(10.0, device=device, requires_grad=True)
                bias = torch.tensor(-10.0, device=device, requires_grad=True)
                args = (image, text, scale, bias, chunk) if name == "sigmoid" else (image, text, scale, chunk)
                loss = loss_fn(*args)
                loss.backward()
                outcome.append((loss.detach(), image.grad, text.grad, scale.grad))
            (dl, di, dt, ds), (sl, si, st, ss) = outcome
            results[f"{name} chunk={chunk}"] = {
                "loss_abs_gap": float((dl - sl).abs()),
                "grad_max_abs_gap": max(float((a - b).abs().max()) for a, b in ((di, si), (dt, st), (ds, ss))),
                "loss": float(sl)}
        return results
    finally:
        dist.destroy_process_group()


PARTS: dict[str, Callable[[torch.device, bool], dict[str, Any]]] = {
    "resume": part_resume, "precision": part_precision, "losses": part_losses,
    "syncs": part_syncs, "monitors": part_monitors, "distributed": part_distributed,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-dry-run", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dry = args.cpu_dry_run
    device = torch.device("cpu") if dry else torch.device("cuda", 0)  # set_device needs the index
    torch.set_num_threads(2 if dry else max(1, min(16, os.cpu_count() or 1)))
    record: dict[str, Any] = {"part": args.part, "dry_run": dry, "torch": torch.__version__}
    start = time.perf_counter()
    try:
        if not dry:
            assert torch.cuda.is_available(), "torch sees no GPU (is .venv's torch a CUDA build?)"
            record["device"] = torch.cuda.get_device_name(device)
        record["result"] = PARTS[args.part](device, dry)
        record["ok"] = True
    except BaseException:  # noqa: BLE001 - the record is the point: every failure is written down
        record["ok"] = False
        record["error"] = traceback.format_exc()
    record["seconds"] = time.perf_counter() - start
    (args.out / f"{args.part}.json").write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, indent=2, default=str))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

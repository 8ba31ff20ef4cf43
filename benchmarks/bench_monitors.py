"""What the per-step monitors cost, and how many host syncs they make.

    .venv/bin/python benchmarks/bench_monitors.py [--runs 5] [--steps 30] [--device cpu|cuda]
    .venv/bin/python benchmarks/bench_monitors.py --skip-trials     # parts 2 and 3 only

1. Throughput: the quickstart model at batch 256 trains `--steps` steps through `run_trial` with
   `monitor.extended` off and on, runs alternating so machine noise hits both alike (2 torch
   threads; samples/s from the summary, i.e. step time only). "Off" still records loss, grad norm,
   temperature, bias and both kinds of spikes; "on" adds per-tower grad norms, parameter and
   update norms, the update RMS and the mean logits.
2. The monitor path alone: the sequence the loop runs every step (grad norms, grad-norm and loss
   spike detectors, the non-finite gate, logit means, update and parameter norms around the
   optimizer step, the update RMS, the row append), timed over `--steps` steps of the same model
   with its gradients from one real backward, against one whole training step. The optimizer step
   itself is timed apart and not counted as monitor cost.
3. Host syncs per step in that path, counted three ways: Python-level reads of a tensor's value
   (`item`, `tolist`, `bool`, `float`, `int`, `cpu`, `numpy`) on any device; on CUDA, every
   synchronising call torch makes (`torch.cuda.set_sync_debug_mode("warn")`); and a run of the
   whole path on the meta device, where reading any value raises. The rows' one copy to the host
   per flush (`DeviceRows.drain`) is counted apart.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from scalestudy.expand import Derived, Trial, derive, trial_id
from scalestudy.losses import sigmoid_loss
from scalestudy.spec import OptimSpec, TrialConfig
from scalestudy.store import RunStore
from scalestudy.train.tokenizers import HashTokenizer
from scalestudy.train.datasets import make_dataset
from scalestudy.train.loop import run_trial
from scalestudy.train.models import TwoTower
from scalestudy.train.monitors import GradNorms, SpikeDetector, UpdateNorm, UpdateRMS, logit_means
from scalestudy.train.optim import NonFiniteGate, make_optimizer
from scalestudy.train.recorder import DeviceRows

BATCH = 256
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
Features = tuple[torch.Tensor, torch.Tensor]


def throughput(extended: bool, steps: int, root: Path) -> float:
    config = TrialConfig(
        train={"batch_size": BATCH, "examples_seen": BATCH * steps, "eval_every": 0,
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


class MonitoredStep:
    """The loop's per-step monitor sequence around `optimizer.step()` (see the module docstring)."""

    def __init__(self, model: TwoTower, optim: OptimSpec, device: torch.device) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(model, optim, lr=1e-4)
        self.grad_norms = GradNorms(model)
        self.spikes = SpikeDetector(3.0, 50, device)
        self.loss_spikes = SpikeDetector(1.5, 50, device)
        self.gate = NonFiniteGate(device)
        self.updates = UpdateNorm(self.params)
        self.update_rms = UpdateRMS(model, self.optimizer)
        self.rows = DeviceRows(self.update_rms.names)

    def monitors_before(self, loss: torch.Tensor, features: Features,
                        scale: torch.Tensor) -> dict[str, torch.Tensor]:
        norms = self.grad_norms()
        is_spike, ratio = self.spikes.update(norms["grad_norm"])
        is_loss_spike, loss_ratio = self.loss_spikes.update(loss)
        self.optimizer.found_inf = self.gate.update(loss, norms["grad_norm"])
        positive, negative = logit_means(*features, scale, self.model.bias)
        self.updates.snapshot()
        return {"loss": loss, **norms, "temperature": scale, "is_spike": is_spike,
                "spike_ratio": ratio, "is_loss_spike": is_loss_spike, "loss_spike_ratio": loss_ratio,
                "logit_pos_mean": positive, "logit_neg_mean": negative}

    def monitors_after(self, step: int, values: dict[str, torch.Tensor]) -> None:
        values.update(self.updates.measure())
        values.update(self.update_rms.read())
        self.rows.append({"step": step}, values)

    def __call__(self, step: int, loss: torch.Tensor, features: Features,
                 scale: torch.Tensor) -> None:
        values = self.monitors_before(loss, features, scale)
        self.optimizer.step()
        self.monitors_after(step, values)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quickstart_model(device: torch.device) -> TwoTower:
    torch.manual_seed(0)
    config = TrialConfig()
    return TwoTower(config.model, config.data.image_size, 10.0, -10.0, True, 100.0).to(device)


def backward_once(model: TwoTower, device: torch.device) -> tuple[torch.Tensor, Features, torch.Tensor]:
    """One real forward and backward of the quickstart model at batch 256 (sigmoid loss)."""
    config = TrialConfig()
    dataset = make_dataset(config.data, 0)
    tokenizer = HashTokenizer(config.model.vocab_size, config.model.context_length)
    batch = dataset.train_batch(1, BATCH)
    images, tokens = batch.images.to(device), tokenizer(batch.captions).to(device)
    image_features, text_features = model(images, tokens)
    scale = model.logit_scale()
    loss = sigmoid_loss(image_features, text_features, scale, model.bias)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), (image_features.detach(), text_features.detach()), scale.detach()


def time_training_step(model: TwoTower, device: torch.device, repeats: int) -> float:
    """Median ms of forward + backward (the rest of a step, without monitors or optimizer)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        backward_once(model, device)
        synchronize(device)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def time_monitor_path(model: TwoTower, device: torch.device, steps: int) -> tuple[float, float, float]:
    """Median ms per step of the monitors and of the optimizer step, and ms per drain of `steps` rows."""
    loss, features, scale = backward_once(model, device)
    step = MonitoredStep(model, OptimSpec(), device)
    monitors, optimizer = [], []
    for i in range(1, steps + 1):
        synchronize(device)
        t0 = time.perf_counter()
        values = step.monitors_before(loss, features, scale)
        synchronize(device)
        t1 = time.perf_counter()
        step.optimizer.step()
        synchronize(device)
        t2 = time.perf_counter()
        step.monitors_after(i, values)
        synchronize(device)
        t3 = time.perf_counter()
        monitors.append(1000 * ((t1 - t0) + (t3 - t2)))
        optimizer.append(1000 * (t2 - t1))
    t0 = time.perf_counter()
    step.rows.drain()
    return statistics.median(monitors), statistics.median(optimizer), 1000 * (time.perf_counter() - t0)


@contextmanager
def counting_value_reads() -> Iterator[Counter[str]]:
    """Count Python-level reads of tensor values (each one a host sync on a GPU)."""
    counts: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name: str, method: Callable) -> Callable:
        def wrapper(self: torch.Tensor, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)
        return wrapper

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def count_syncs(model: TwoTower, device: torch.device, steps: int) -> dict[str, float]:
    loss, features, scale = backward_once(model, device)
    figures: dict[str, float] = {}
    for kind in ("adamw", "stable_adamw"):
        step = MonitoredStep(model, OptimSpec(kind=kind), device)
        step(0, loss, features, scale)  # optimizer state and the first-step paths out of the way
        with counting_value_reads() as reads, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            for i in range(1, steps + 1):
                step(i, loss, features, scale)
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            per_step_reads = sum(reads.values())
            step.rows.drain()
            drain_reads = sum(reads.values()) - per_step_reads
        figures[f"{kind}: value reads per step"] = per_step_reads / steps
        figures[f"{kind}: value reads per drain"] = drain_reads
        if device.type == "cuda":
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            figures[f"{kind}: CUDA synchronising calls per step (incl. drain)"] = len(syncs) / steps
    return figures


def meta_run(steps: int) -> str:
    """The monitor path on the meta device: completes only if no value is ever read."""
    model = quickstart_model(torch.device("meta"))
    meta = torch.device("meta")
    for kind in ("stable_adamw",):  # torch's fused AdamW has no meta kernels
        step = MonitoredStep(model, OptimSpec(kind=kind), meta)
        dim = TrialConfig().model.embed_dim
        features = (torch.empty(BATCH, dim, device=meta), torch.empty(BATCH, dim, device=meta))
        for i in range(steps):
            for p in step.params:
                p.grad = torch.empty_like(p)
            step(i, torch.empty((), device=meta), features, model.logit_scale().detach())
    return f"{steps} steps completed on the meta device (StableAdamW): no value read"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--skip-trials", action="store_true", help="only parts 2 and 3")
    args = parser.parse_args()
    torch.set_num_threads(2)
    device = torch.device(args.device)

    if not args.skip_trials:
        results: dict[bool, list[float]] = {True: [], False: []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.runs):
                for extended in (False, True):
                    results[extended].append(throughput(extended, args.steps, Path(tmp)))
        off, on = statistics.median(results[False]), statistics.median(results[True])
        print("| monitors | samples/s (median) | runs |")
        print("|---|---|---|")
        runs = {extended: ", ".join(f"{v:.0f}" for v in values) for extended, values in results.items()}
        print(f"| off (grad norm + spikes only) | {off:.0f} | {runs[False]} |")
        print(f"| on (all monitors) | {on:.0f} | {runs[True]} |")
        print(f"\nmonitor cost: {100 * (off - on) / off:.1f}% of throughput\n")

    model = quickstart_model(device)
    forward_backward = time_training_step(model, device, max(3, args.steps // 5))
    monitors, optimizer, drain = time_monitor_path(model, device, args.steps)
    print(f"| per step on {device.type}, batch {BATCH} | ms (median of {args.steps}) |")
    print("|---|---:|")
    print(f"| forward + backward | {forward_backward:.1f} |")
    print(f"| optimizer step (AdamW, fused) | {optimizer:.2f} |")
    print(f"| all monitors | {monitors:.2f} |")
    share = 100 * monitors / (forward_backward + optimizer)
    print(f"| monitors / (forward + backward + optimizer) | {share:.1f} % |")
    print(f"| one drain of {args.steps} rows | {drain:.2f} |\n")

    for name, value in count_syncs(model, device, args.steps).items():
        print(f"{name}: {value:g}")
    print(meta_run(3))


if __name__ == "__main__":
    main()

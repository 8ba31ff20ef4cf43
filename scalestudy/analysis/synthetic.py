"""A synthetic run directory in the store's own layout, written with the store's own writers.

For the report benchmark (1,000 trials × 10,000 steps without training any of them) and for tests
that need failed and diverged trials on demand. Nothing here trains: each trial's history is drawn
from a known model, so an analysis can be checked against the truth it should recover.

Accuracy follows a saturating power law in the batch size, acc(B) = y_inf − c·B^−α, per loss
(`TRUTH`), plus Gaussian seed noise; the loss decays exponentially; the gradient norm is
log-normal with occasional spikes, more of them at larger batch sizes and with beta2 = 0.999.
Spikes are flagged, and summary.json written, by the trial's own `SpikeDetector` and
`summarize`, so the synthetic figures follow the same definitions as trained ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from scalestudy.expand import axes, expand
from scalestudy.spec import StudySpec
from scalestudy.store import Manifest, RunStore, Status, Trial, atomic_write_parquet, part_name, write_results
from scalestudy.train.monitors import SpikeDetector
from scalestudy.train.summary import summarize

# (y_inf, c, alpha) per loss: sigmoid higher at small batch, both near 0.6 at large (SigLIP Fig. 2).
TRUTH: dict[str, tuple[float, float, float]] = {
    "softmax": (0.60, 0.90, 0.5),
    "sigmoid": (0.62, 0.60, 0.5),
}
SEED_NOISE = 0.01
NUM_CLASSES = 40


def true_accuracy(kind: str, batch: int) -> float:
    y_inf, c, alpha = TRUTH[kind]
    return y_inf - c * batch ** -alpha


def synthetic_steps(trial: Trial, steps: int, rng: np.random.Generator, stop: int | None = None) -> pl.DataFrame:
    """Per-step rows in the contract's columns for `steps` steps (or until `stop`)."""
    cfg = trial.config
    n = stop or steps
    step = np.arange(1, n + 1)
    batch = cfg.train.batch_size
    loss = math.log(batch) * np.exp(-step / (steps / 3)) + 0.3 + rng.normal(0, 0.02, n)
    grad = np.exp(rng.normal(0.0, 0.2, n))
    spike_p = 0.0005 * math.log2(batch) * (3 if cfg.optim.beta2 > 0.99 else 1)
    spiking = rng.random(n) < spike_p
    grad = np.where(spiking, grad * rng.uniform(4, 20, n), grad)
    sigmoid = cfg.loss.kind == "sigmoid"
    bias_init = trial.derived.bias_init
    bias = (np.linspace(bias_init, bias_init / 2, n) if sigmoid and bias_init is not None
            else np.full(n, np.nan))
    monitor = cfg.monitor
    is_spike, spike_ratio = SpikeDetector(monitor.spike_threshold, monitor.spike_window).update_many(
        torch.from_numpy(grad))
    is_loss_spike, loss_spike_ratio = SpikeDetector(
        monitor.loss_spike_threshold, monitor.loss_spike_window).update_many(torch.from_numpy(loss))
    return pl.DataFrame({
        "step": step,
        "examples_seen": step * batch,
        "loss": loss,
        "grad_norm": grad,
        "lr": np.full(n, trial.derived.lr),
        "temperature": np.linspace(trial.derived.temperature_init, 30.0, n),
        "bias": bias,
        "is_spike": is_spike.numpy(),
        "spike_ratio": spike_ratio.numpy(),
        "is_loss_spike": is_loss_spike.numpy(),
        "loss_spike_ratio": loss_spike_ratio.numpy(),
        "step_time_s": np.full(n, 0.01),
        "rms_max": np.abs(rng.normal(0.9, 0.05, n)),
    }).with_columns(pl.col("bias", "spike_ratio", "loss_spike_ratio").fill_nan(None))


Outcome = Callable[[Trial], str]


def write_synthetic_run(out: str | Path, study: dict[str, Any], steps: int | None = None,
                        status_of: Outcome = lambda trial: Status.DONE, seed: int = 0) -> RunStore:
    """Write `study` (a study mapping) as if it had run: every trial finished as `status_of` says.

    `steps` fixes every trial's length (default: the trial's own derived steps). A `diverged`
    trial stops at half its steps; a `failed` one keeps a partial history, no summary and an error.
    Returns the run directory's store, with results.parquet written by the real results code.
    """
    spec = StudySpec.model_validate(study)
    trials = expand(spec)
    store = RunStore(Path(out) / spec.name)
    store.write_study(Manifest(name=spec.name, description=spec.description, axes=axes(spec),
                               trial_ids=[t.trial_id for t in trials],
                               study=spec.model_dump(mode="json")))
    rng = np.random.default_rng(seed)
    for trial in trials:
        ts = store.add_trial(trial)
        status = Status(status_of(trial))
        length = steps or trial.derived.steps
        stop = length // 2 if status in (Status.DIVERGED, Status.FAILED) else None
        metrics = synthetic_steps(trial, length, rng, stop)
        atomic_write_parquet(ts.metrics_dir / part_name(1, metrics.height), metrics)
        now = time.time()
        error = {Status.FAILED: "RuntimeError: synthetic failure",
                 Status.DIVERGED: f"diverged at step {metrics.height}: non-finite loss"}.get(status)
        ts.update_state(status=status, attempts=1, started_at=now, finished_at=now,
                        step=metrics.height, error=error)
        if status == Status.FAILED:
            continue
        accuracy = true_accuracy(trial.config.loss.kind, trial.config.train.batch_size)
        accuracy += float(rng.normal(0, SEED_NOISE))
        final_eval = pl.DataFrame({
            "step": [metrics.height], "examples_seen": [metrics.height * trial.config.train.batch_size],
            "zeroshot_top1": [accuracy], "retrieval_i2t_r1": [accuracy * 0.8],
            "retrieval_t2i_r1": [accuracy * 0.7],
        })
        summary = summarize(metrics, final_eval, trial, status == Status.DIVERGED,
                            0.01 * metrics.height, NUM_CLASSES)
        # `steps` may override the trial's own length: the summary reports the length written.
        summary.update(steps=length, examples_seen=length * trial.config.train.batch_size)
        ts.write_summary(summary)
    write_results(store)
    return store

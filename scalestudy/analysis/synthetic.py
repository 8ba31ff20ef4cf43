"""A synthetic run directory in the store's own layout, written with the store's own writers.

For the report benchmark (1,000 trials × 10,000 steps without training any of them) and for tests
that need failed, diverged, stalled or spiking trials on demand. Nothing here trains: each trial's
history is drawn from a known model, so an analysis can be checked against the truth it should
recover.

Accuracy follows a saturating power law in the batch size, acc(B) = y_inf − c·B^−α, per loss
(`TRUTH`), plus Gaussian seed noise; during training it approaches that value as
1 − exp(−3·step/steps), evaluated on the trial's own `train.eval_every` schedule (zero-shot top-1,
per-attribute zero-shot and a linear probe, in fixed ratios to it). The loss decays exponentially;
the gradient norm is log-normal with occasional spikes, more of them at larger batch sizes and
with beta2 = 0.999. `PlantedSpikes` adds loss spikes, each preceded by an update-RMS bump (the
mechanism of Wortsman et al. 2023 §3.4) or, for a negative control, not. A stalled trial's loss
stays at its no-learning level and its accuracy at chance. Spikes of both kinds are flagged, and
summary.json written, by the trial's own `SpikeDetector` and `summarize`, so the synthetic figures
follow the same definitions as trained ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from scalestudy.expand import axes, expand
from scalestudy.spec import StudySpec
from scalestudy.store import (
    Manifest,
    RunStore,
    Status,
    Trial,
    atomic_write_parquet,
    part_name,
    write_results,
)
from scalestudy.train.loop import is_due
from scalestudy.train.monitors import SpikeDetector
from scalestudy.train.summary import no_learning_loss, summarize

# (y_inf, c, alpha) per loss: sigmoid higher at small batch, both near 0.6 at large (SigLIP Fig. 2).
TRUTH: dict[str, tuple[float, float, float]] = {
    "softmax": (0.60, 0.90, 0.5),
    "sigmoid": (0.62, 0.60, 0.5),
}
SEED_NOISE = 0.01
NUM_CLASSES = 40
# Evaluation figures as fixed multiples of the zero-shot top-1 (capped at 1): attributes with
# fewer classes are easier, and a linear probe beats zero-shot transfer.
EVAL_RATIOS = {"zeroshot_top1_colour": 1.5, "zeroshot_top1_shape": 1.2, "linear_probe_top1": 1.3}
RMS_LEVEL, RMS_PATCH_LEVEL, RMS_NOISE = 0.9, 0.8, 0.05  # Adam's steady update RMS is about 1


def true_accuracy(kind: str, batch: int) -> float:
    y_inf, c, alpha = TRUTH[kind]
    return y_inf - c * batch ** -alpha


def duplicate_rate(batch: int) -> float:
    """The share of a batch's captions that repeat another's: a few hundred distinct captions, so
    it grows with the batch size (as the shapes data's does)."""
    return 1 - math.exp(-batch / 400)


@dataclass(frozen=True)
class PlantedSpikes:
    """Loss spikes to plant in synthetic runs: a known answer for the instability analyses.

    Each trial gets Poisson(`rate_per_1k(trial)` × steps / 1000) events (at most one per `gap`
    steps, none in its first `gap`, so the running median each is judged against is clean). At an
    event step e the loss is multiplied by `jump` and at e + 1 by `tail` (below the detector's
    1.5×, so each event is one flagged step and one onset); with `bumps`, rms_max is `bump` (and
    rms_patch_embed 0.8 × `bump`) at step e − `lead`, far above its steady level of about 0.9.
    `decoys_per_1k` adds RMS bumps that no spike follows (at least `gap` / 2 steps from any event),
    so a predictor's precision is events / (events + decoys).
    """

    rate_per_1k: Callable[[Trial], float]
    lead: int = 3
    bump: float = 4.0
    jump: float = 2.5
    tail: float = 1.2
    gap: int = 60
    bumps: bool = True
    decoys_per_1k: float = 0.0

    def events(self, steps: int, trial: Trial, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Event steps and decoy steps (1-based, ascending) for a trial of `steps` steps."""
        slots = np.arange(self.gap, steps - 5, self.gap)
        count = min(int(rng.poisson(self.rate_per_1k(trial) * steps / 1000)), slots.size)
        order = rng.permutation(slots.size)
        chosen = np.sort(slots[order[:count]]) + rng.integers(0, max(1, self.gap // 4), count)
        # Decoys sit half-way between slots, so no decoy bump falls in an event's lookback.
        free = slots[order[count:]] + self.gap // 2
        decoys = min(int(rng.poisson(self.decoys_per_1k * steps / 1000)), free.size)
        return chosen, np.sort(free[:decoys])


def synthetic_steps(trial: Trial, steps: int, rng: np.random.Generator, stop: int | None = None,
                    spikes: PlantedSpikes | None = None, stalled: bool = False) -> pl.DataFrame:
    """Per-step rows in the contract's columns for `steps` steps (or until `stop`)."""
    cfg = trial.config
    n = stop or steps
    step = np.arange(1, n + 1)
    batch = cfg.train.batch_size
    if stalled:
        level = no_learning_loss(cfg.loss.kind, batch, cfg.loss.negative_weight,
                                 cfg.loss.negative_mask_ratio)
        loss = level * (1 + rng.normal(0, 0.002, n))
    else:
        loss = math.log(batch) * np.exp(-step / (steps / 3)) + 0.3 + rng.normal(0, 0.02, n)
    grad = np.exp(rng.normal(0.0, 0.2, n))
    spike_p = 0.0005 * math.log2(batch) * (3 if cfg.optim.beta2 > 0.99 else 1)
    spiking = rng.random(n) < spike_p
    grad = np.where(spiking, grad * rng.uniform(4, 20, n), grad)
    rms = np.abs(rng.normal(RMS_LEVEL, RMS_NOISE, n))
    rms_patch = np.abs(rng.normal(RMS_PATCH_LEVEL, RMS_NOISE, n))
    if spikes is not None:
        events, decoys = spikes.events(steps, trial, rng)
        for event in events:
            i = event - 1
            if i + 1 >= n:
                continue  # after the trial stopped (diverged): never happened
            loss[i] *= spikes.jump
            loss[i + 1] *= spikes.tail
            if spikes.bumps:
                rms[i - spikes.lead] = spikes.bump
                rms_patch[i - spikes.lead] = 0.8 * spikes.bump
        for decoy in decoys[decoys < n]:
            rms[decoy - 1] = spikes.bump
            rms_patch[decoy - 1] = 0.8 * spikes.bump
    sigmoid = cfg.loss.kind == "sigmoid"
    bias_init = trial.derived.bias_init
    bias = (np.linspace(bias_init, bias_init / 2, n) if sigmoid and bias_init is not None
            else np.full(n, np.nan))
    monitor = cfg.monitor
    is_spike, spike_ratio = SpikeDetector(monitor.spike_threshold, monitor.spike_window).update_many(
        torch.from_numpy(grad))
    is_loss_spike, loss_spike_ratio = SpikeDetector(
        monitor.loss_spike_threshold, monitor.loss_spike_window,
        mads=monitor.loss_spike_mads if monitor.loss_spike_rule == "mad" else None,
    ).update_many(torch.from_numpy(loss))
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
        "dup_caption_rate": np.clip(duplicate_rate(batch) + rng.normal(0, 0.01, n), 0, 1),
        "rms_max": rms,
        "rms_patch_embed": rms_patch,
    }).with_columns(pl.col("bias", "spike_ratio", "loss_spike_ratio").fill_nan(None))


def synthetic_evals(trial: Trial, final: float, steps: int, last: int,
                    rng: np.random.Generator) -> pl.DataFrame:
    """Evaluation rows at the trial's `train.eval_every` steps up to `last` (always at `last`):
    zero-shot top-1 rising to `final` as 1 − exp(−3·step/steps) from chance, the other figures in
    `EVAL_RATIOS` to it, retrieval at 0.8× and 0.7× it."""
    at = [s for s in range(1, last + 1) if is_due(s, trial.config.train.eval_every, last)]
    step = np.array(at)
    chance = 1 / NUM_CLASSES
    top1 = chance + (final - chance) * (1 - np.exp(-3 * step / steps))
    top1[:-1] += rng.normal(0, SEED_NOISE / 2, step.size - 1)
    top1[-1] = final  # the last evaluation is the trial's result
    batch = trial.config.train.batch_size
    frame = {"step": step, "examples_seen": step * batch, "zeroshot_top1": top1,
             "retrieval_i2t_r1": top1 * 0.8, "retrieval_t2i_r1": top1 * 0.7}
    frame.update({name: np.minimum(1.0, top1 * ratio) for name, ratio in EVAL_RATIOS.items()})
    return pl.DataFrame(frame)


Outcome = Callable[[Trial], str]


def write_synthetic_run(out: str | Path, study: dict[str, Any], steps: int | None = None,
                        status_of: Outcome = lambda trial: Status.DONE, seed: int = 0,
                        spikes: PlantedSpikes | None = None,
                        stalled_of: Callable[[Trial], bool] = lambda trial: False) -> RunStore:
    """Write `study` (a study mapping) as if it had run: every trial finished as `status_of` says.

    `steps` fixes every trial's length (default: the trial's own derived steps). A `diverged`
    trial stops at half its steps; a `failed` one keeps a partial history, no summary and an error.
    `spikes` plants loss spikes (and RMS bumps); trials for which `stalled_of` is true stall.
    A trial's final accuracy is the truth plus its seed's share of the noise (trials with the same
    `train.seed` see the same data, so their luck is shared, as paired comparisons assume) plus
    noise of its own. Returns the run directory's store, with results.parquet written by the real
    results code.
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
        stalled = stalled_of(trial)
        length = steps or trial.derived.steps
        stop = length // 2 if status in (Status.DIVERGED, Status.FAILED) else None
        metrics = synthetic_steps(trial, length, rng, stop, spikes, stalled)
        atomic_write_parquet(ts.metrics_dir / part_name(1, metrics.height), metrics)
        now = time.time()
        error = {Status.FAILED: "RuntimeError: synthetic failure",
                 Status.DIVERGED: f"diverged at step {metrics.height}: non-finite loss"}.get(status)
        ts.update_state(status=status, attempts=1, started_at=now, finished_at=now,
                        step=metrics.height, error=error)
        if status == Status.FAILED:
            continue
        cfg = trial.config
        shared = np.random.default_rng([seed, cfg.train.seed]).normal(0, SEED_NOISE * math.sqrt(0.8))
        own = rng.normal(0, SEED_NOISE * math.sqrt(0.2))
        accuracy = (1 / NUM_CLASSES if stalled else true_accuracy(cfg.loss.kind, cfg.train.batch_size))
        evals = synthetic_evals(trial, accuracy + float(shared + own), length, metrics.height, rng)
        atomic_write_parquet(ts.evals_path, evals)  # what append_eval leaves, in one write
        summary = summarize(metrics, evals, trial, status == Status.DIVERGED,
                            0.01 * metrics.height, NUM_CLASSES)
        # `steps` may override the trial's own length: the summary reports the length written.
        summary.update(steps=length, examples_seen=length * cfg.train.batch_size)
        ts.write_summary(summary)
    write_results(store)
    return store

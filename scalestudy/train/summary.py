"""A trial's final figures, computed from its stored history alone (so resume cannot skew them)."""

from __future__ import annotations

import math
import statistics
from typing import Any

import polars as pl

from scalestudy.expand import Trial
from scalestudy.losses import NegativeWeight, resolve_negatives
from scalestudy.train.throughput import training_flops_per_sample

# The final loss is averaged over the last steps: one step's loss is too noisy to compare trials.
FINAL_LOSS_STEPS = 10
# A trial has stalled when its final loss is within this fraction of the no-learning loss (or
# above it): it ended about where one shared logit for every pair would have.
STALL_TOLERANCE = 0.02
# Evaluation bookkeeping columns; every other column of the last evaluation is copied through.
EVAL_BOOKKEEPING = ("step", "examples_seen")


def no_learning_loss(
    kind: str, batch_size: int, negative_weight: NegativeWeight = None,
    negative_mask_ratio: float = 0.0,
) -> float:
    """The loss of the best single logit s shared by every pair: what a model that learned
    nothing about which image goes with which caption can reach.

    softmax: every row is uniform, so both cross-entropies are log B, whatever s is.
    sigmoid (SigLIP's sum over pairs / B): one positive and n = w·(1 − r)·(B − 1) weighted
    negatives per row (w the negative weight, r the mask ratio, in expectation), so the loss is
    softplus(−s) + n·softplus(s), least at σ(s) = 1/(1 + n): log(1 + n) + n·log(1 + 1/n). With
    w = 1 and r = 0 that is log B + (B − 1)·log(B / (B − 1)) ≈ log B + 1.
    """
    if kind == "softmax":
        return math.log(batch_size)
    if kind != "sigmoid":
        raise ValueError(f"no_learning_loss: loss kind {kind!r} is neither 'softmax' nor 'sigmoid'")
    if not 0.0 <= negative_mask_ratio < 1.0:
        raise ValueError(f"negative_mask_ratio={negative_mask_ratio}: use a fraction in [0, 1)")
    weight = resolve_negatives(batch_size, negative_weight, 0.0, None).weight
    n = weight * (1 - negative_mask_ratio) * (batch_size - 1)
    return 0.0 if n == 0 else math.log1p(n) + n * math.log1p(1 / n)


def steps_to_recover(losses: list[float], spike_steps: list[int], first_step: int, window: int) -> int | None:
    """The longest time, over spikes, until the loss is back at or below its pre-spike level.

    The pre-spike level is the median loss over the `window` steps before the spike (one step's
    loss is too noisy a reference). None when there is no spike; a spike the loss never recovers
    from counts as the steps left until the end.
    """
    worst: int | None = None
    for spike in spike_steps:
        i = spike - first_step
        before = losses[max(0, i - window):i]
        if not before:
            continue
        level = statistics.median(before)
        after = losses[i + 1:]
        recovered = next((k + 1 for k, loss in enumerate(after) if loss <= level), len(after))
        worst = recovered if worst is None else max(worst, recovered)
    return worst


def _spike_figures(metrics: pl.DataFrame, flag: str, ratio: str, window: int, prefix: str,
                   recover_key: str) -> dict[str, Any]:
    """Count, rate per 1,000 steps, worst ratio, first step and steps to recover of one kind of
    spike (flag column `flag`, ratio column `ratio`)."""
    steps_done = metrics.height
    present = steps_done > 0 and flag in metrics.columns
    spikes = metrics.filter(pl.col(flag)) if present else metrics.clear()
    ratios = (metrics[ratio].cast(pl.Float64).drop_nulls().drop_nans()
              if present and ratio in metrics.columns else None)
    return {
        f"{prefix}spike_count": spikes.height,
        f"{prefix}spike_rate_per_1k": 1000 * spikes.height / steps_done if steps_done else None,
        f"max_{prefix}spike_ratio": float(ratios.max()) if ratios is not None and len(ratios) else None,
        f"first_{prefix}spike_step": int(spikes["step"].min()) if spikes.height else None,
        recover_key: (
            steps_to_recover(metrics["loss"].to_list(), spikes["step"].to_list(),
                             int(metrics["step"][0]), window)
            if spikes.height else None
        ),
    }


def summarize(
    metrics: pl.DataFrame, evals: pl.DataFrame, trial: Trial, diverged: bool, wall_s: float,
    num_classes: int,
) -> dict[str, Any]:
    """The figures summary.json holds (results.parquet's per-trial columns come from them).

    Grad-norm spikes (`spike_*`) and loss spikes (`loss_spike_*`, the primary instability event:
    Wortsman et al. 2023 §3.4) get the same figures. Every column of the last evaluation row is
    copied through, so new evaluation figures reach the summary without a change here.
    """
    cfg, derived = trial.config, trial.derived
    steps_done = metrics.height
    tail = metrics.tail(FINAL_LOSS_STEPS)["loss"] if steps_done else pl.Series([], dtype=pl.Float64)
    final_loss = None if diverged or tail.is_empty() else float(tail.mean())
    baseline = no_learning_loss(cfg.loss.kind, cfg.train.batch_size, cfg.loss.negative_weight,
                                cfg.loss.negative_mask_ratio)
    last_eval = evals.row(-1, named=True) if evals.height else {}
    top1 = evals["zeroshot_top1"].drop_nulls() if "zeroshot_top1" in evals.columns else None
    dup = (metrics["dup_caption_rate"].drop_nulls()
           if steps_done and "dup_caption_rate" in metrics.columns else pl.Series([], dtype=pl.Float64))
    step_time = float(metrics["step_time_s"].sum()) if steps_done else 0.0
    batch = derived.examples_seen // derived.steps
    # Collapse: at CPU scale an unstable run rarely reaches NaN; it falls back to the no-learning
    # loss instead, and `stalled` sees only its end. Counted after warm-up, by the same tolerance.
    trained = metrics.filter(pl.col("step") > derived.warmup_steps) if steps_done else metrics
    collapsed = (int((trained["loss"] >= (1 - STALL_TOLERANCE) * baseline).sum())
                 if trained.height and baseline is not None else None)
    summary: dict[str, Any] = {
        "steps": derived.steps,
        "examples_seen": derived.examples_seen,
        "step": int(metrics["step"].max()) if steps_done else 0,
        "final_loss": final_loss,
        "no_learning_loss": baseline,
        "stalled": None if final_loss is None else final_loss >= (1 - STALL_TOLERANCE) * baseline,
        "collapsed_steps": collapsed,
        "collapse_fraction": None if collapsed is None else collapsed / trained.height,
        "zeroshot_top1": last_eval.get("zeroshot_top1"),
        "zeroshot_top5": last_eval.get("zeroshot_top5"),
        "zeroshot_chance": 1 / num_classes if num_classes else None,
        "best_zeroshot_top1": float(top1.max()) if top1 is not None and len(top1) else None,
        "retrieval_i2t_r1": last_eval.get("retrieval_i2t_r1"),
        "retrieval_t2i_r1": last_eval.get("retrieval_t2i_r1"),
        **_spike_figures(metrics, "is_spike", "spike_ratio", cfg.monitor.spike_window, "",
                         "steps_to_recover"),
        **_spike_figures(metrics, "is_loss_spike", "loss_spike_ratio",
                         cfg.monitor.loss_spike_window, "loss_", "loss_steps_to_recover"),
        "dup_caption_rate": float(dup.mean()) if len(dup) else None,
        "diverged": diverged,
        "wall_s": wall_s,
        "samples_per_s": steps_done * batch / step_time if step_time > 0 else None,
    }
    for key, value in last_eval.items():
        if key not in EVAL_BOOKKEEPING and key not in summary:
            summary[key] = value
    return summary


def _known(metrics: pl.DataFrame, name: str) -> pl.Series:
    """A float column's known values (empty when the history has none)."""
    if metrics.height == 0 or name not in metrics.columns:
        return pl.Series([], dtype=pl.Float64)
    return metrics[name].cast(pl.Float64).drop_nulls().drop_nans()


def throughput_figures(
    summary: dict[str, Any], metrics: pl.DataFrame, trial: Trial, peak_flops: float | None,
    devices: int,
) -> dict[str, Any]:
    """How fast the trial ran against its hardware, from the stored history (added to summary.json
    beside `summarize`'s figures, whose `samples_per_s` it builds on).

    `flops_per_sample`: model FLOPs of one pair in a training step (scalestudy.train.throughput);
    `mfu`: those FLOPs per second per device over `peak_flops`, one device's peak dense FLOP/s in
    the trial's arithmetic (None when unknown, as on a CPU without train.peak_tflops), with the
    wall-clock samples_per_s (data, monitors and all); `peak_tflops`: the peak used;
    `device_step_time_s`: the median CUDA-event step time (None on a CPU); `peak_memory_gib`: the
    largest peak any flush recorded (CUDA: allocated tensors; CPU: the process's RSS).
    """
    flops = training_flops_per_sample(trial.config)
    samples_per_s = summary.get("samples_per_s")
    device_time, memory = _known(metrics, "device_step_time_s"), _known(metrics, "peak_memory_gib")
    return {
        "flops_per_sample": flops,
        "mfu": flops * samples_per_s / devices / peak_flops if samples_per_s and peak_flops else None,
        "peak_tflops": None if peak_flops is None else peak_flops / 1e12,
        "device_step_time_s": float(device_time.median()) if len(device_time) else None,
        "peak_memory_gib": float(memory.max()) if len(memory) else None,
    }

"""A trial's final figures, computed from its stored history alone (so resume cannot skew them)."""

from __future__ import annotations

from typing import Any

import polars as pl

from scalestudy.expand import Derived

# The final loss is averaged over the last steps: one step's loss is too noisy to compare trials.
FINAL_LOSS_STEPS = 10


def steps_to_recover(losses: list[float], spike_steps: list[int], first_step: int, window: int) -> int | None:
    """The longest time, over grad-norm spikes, until the loss is back at or below its pre-spike level.

    The pre-spike level is the median loss over the `window` steps before the spike (one step's
    loss is too noisy a reference). None when there is no spike; a spike the loss never recovers
    from counts as the steps left until the end.
    """
    worst: int | None = None
    for spike in spike_steps:
        i = spike - first_step
        before = sorted(losses[max(0, i - window):i])
        if not before:
            continue
        level = before[len(before) // 2]
        after = losses[i + 1:]
        recovered = next((k + 1 for k, loss in enumerate(after) if loss <= level), len(after))
        worst = recovered if worst is None else max(worst, recovered)
    return worst


def summarize(
    metrics: pl.DataFrame, evals: pl.DataFrame, derived: Derived, diverged: bool, wall_s: float,
    num_classes: int, spike_window: int,
) -> dict[str, Any]:
    steps_done = metrics.height
    tail = metrics.tail(FINAL_LOSS_STEPS)["loss"] if steps_done else pl.Series([], dtype=pl.Float64)
    final_loss = None if diverged or tail.is_empty() else float(tail.mean())
    spikes = metrics.filter(pl.col("is_spike")) if steps_done else metrics
    last_eval = evals.row(-1, named=True) if evals.height else {}
    step_time = float(metrics["step_time_s"].sum()) if steps_done else 0.0
    batch = derived.examples_seen // derived.steps
    return {
        "steps": derived.steps,
        "examples_seen": derived.examples_seen,
        "step": int(metrics["step"].max()) if steps_done else 0,
        "final_loss": final_loss,
        "zeroshot_top1": last_eval.get("zeroshot_top1"),
        "zeroshot_top5": last_eval.get("zeroshot_top5"),
        "zeroshot_chance": 1 / num_classes,
        "best_zeroshot_top1": float(evals["zeroshot_top1"].max()) if evals.height else None,
        "retrieval_i2t_r1": last_eval.get("retrieval_i2t_r1"),
        "retrieval_t2i_r1": last_eval.get("retrieval_t2i_r1"),
        "spike_count": spikes.height,
        "max_spike_ratio": (
            float(metrics["spike_ratio"].max())
            if steps_done and metrics["spike_ratio"].null_count() < steps_done
            else None
        ),
        "first_spike_step": int(spikes["step"].min()) if spikes.height else None,
        "spike_rate_per_1k": 1000 * spikes.height / steps_done if steps_done else None,
        "loss_spike_count": int(metrics["is_loss_spike"].sum()) if steps_done else 0,
        "steps_to_recover": (
            steps_to_recover(metrics["loss"].to_list(), spikes["step"].to_list(),
                             int(metrics["step"][0]), spike_window)
            if spikes.height else None
        ),
        "diverged": diverged,
        "wall_s": wall_s,
        "samples_per_s": steps_done * batch / step_time if step_time > 0 else None,
    }

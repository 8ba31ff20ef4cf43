"""A trial's final figures, computed from its stored history alone (so resume cannot skew them)."""

from __future__ import annotations

from typing import Any

import polars as pl

from scalestudy.expand import Derived

# The final loss is averaged over the last steps: one step's loss is too noisy to compare trials.
FINAL_LOSS_STEPS = 10


def summarize(
    metrics: pl.DataFrame, evals: pl.DataFrame, derived: Derived, diverged: bool, wall_s: float,
    num_classes: int,
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
        "diverged": diverged,
        "wall_s": wall_s,
        "samples_per_s": steps_done * batch / step_time if step_time > 0 else None,
    }

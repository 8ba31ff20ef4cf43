"""The column contracts of the run directory (README "The results store"): per step, per trial.

The trial loop writes the per-step rows, `scalestudy.store.results` the per-trial frame; readers
(analysis, dashboard) scan with these schemas so files written with and without optional columns
(the extended monitors, a softmax trial's all-null `bias`) read as one frame.
"""

from __future__ import annotations

import polars as pl

# The per-step columns (README "Per-step columns"; the extended monitors add the second block).
STEP_SCHEMA: dict[str, pl.DataType] = {
    "step": pl.Int64(),
    "examples_seen": pl.Int64(),
    "loss": pl.Float64(),
    "grad_norm": pl.Float64(),
    "lr": pl.Float64(),
    "temperature": pl.Float64(),
    "bias": pl.Float64(),
    "is_spike": pl.Boolean(),
    "spike_ratio": pl.Float64(),
    "is_loss_spike": pl.Boolean(),
    "loss_spike_ratio": pl.Float64(),
    "step_time_s": pl.Float64(),
    "dup_caption_rate": pl.Float64(),
    "grad_norm_image": pl.Float64(),
    "grad_norm_text": pl.Float64(),
    "logit_pos_mean": pl.Float64(),
    "logit_neg_mean": pl.Float64(),
    "rms_max": pl.Float64(),
    "rms_max_name": pl.String(),
    "rms_patch_embed": pl.Float64(),
    "rms_temperature": pl.Float64(),
    "rms_bias": pl.Float64(),
    "update_norm": pl.Float64(),
    "param_norm": pl.Float64(),
    # Per flush window (every row of a window carries it): the device's step time from CUDA
    # events (null on a CPU) and the process's peak memory so far.
    "device_step_time_s": pl.Float64(),
    "peak_memory_gib": pl.Float64(),
    # train.precision=fp16 only: the loss scaler skipped this step (its gradients overflowed).
    "grad_overflow": pl.Boolean(),
}

# The per-trial columns every results.parquet and `status --json` have, with their types; then
# come the trial's other summary figures (e.g. `zeroshot_top1_<attribute>` of the shapes data),
# every config key as a dotted column and `derived.*`.
RESULT_COLUMNS: dict[str, pl.DataType] = {
    "trial_id": pl.String(),
    "status": pl.String(),
    "steps": pl.Int64(),
    "examples_seen": pl.Int64(),
    "step": pl.Int64(),
    "final_loss": pl.Float64(),
    "zeroshot_top1": pl.Float64(),
    "zeroshot_chance": pl.Float64(),
    "best_zeroshot_top1": pl.Float64(),
    "retrieval_i2t_r1": pl.Float64(),
    "retrieval_t2i_r1": pl.Float64(),
    "spike_count": pl.Int64(),
    "max_spike_ratio": pl.Float64(),
    "first_spike_step": pl.Int64(),
    "spike_rate_per_1k": pl.Float64(),
    "loss_spike_count": pl.Int64(),
    "loss_spike_rate_per_1k": pl.Float64(),
    "max_loss_spike_ratio": pl.Float64(),
    "first_loss_spike_step": pl.Int64(),
    "steps_to_recover": pl.Int64(),
    "loss_steps_to_recover": pl.Int64(),
    "no_learning_loss": pl.Float64(),
    "stalled": pl.Boolean(),
    "collapsed_steps": pl.Int64(),
    "collapse_fraction": pl.Float64(),
    "linear_probe_top1": pl.Float64(),
    "dup_caption_rate": pl.Float64(),
    "diverged": pl.Boolean(),
    "wall_s": pl.Float64(),
    "samples_per_s": pl.Float64(),
    "flops_per_sample": pl.Float64(),
    "mfu": pl.Float64(),
    "device_step_time_s": pl.Float64(),
    "peak_memory_gib": pl.Float64(),
    "error": pl.String(),
}

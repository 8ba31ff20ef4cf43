"""Analysis: bootstrap CIs over seeds, power-law fits, and the report on stores with failed and
diverged trials (synthetic stores written with the store's own writers; nothing trains here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from scalestudy.analysis import figures
from scalestudy.analysis.aggregate import aggregate, scan_steps, seed_stats
from scalestudy.analysis.fits import FitFailure, FitSummary, fit_power_law, fit_with_bands
from scalestudy.analysis.report import accuracy_fits
from scalestudy.analysis.summary import counts_line, findings
from scalestudy.analysis.synthetic import TRUTH, write_synthetic_run
from scalestudy.cli import main
from scalestudy.expand import Trial

AXES = ["loss.kind", "train.batch_size", "train.seed"]


def batch_study(name: str = "syn", sizes: list[int] | None = None, seeds: int = 2) -> dict:
    return {
        "name": name,
        "base": {"train": {"examples_seen": 1024}},
        "sweep": {"grid": {"loss.kind": ["softmax", "sigmoid"],
                           "train.batch_size": sizes or [16, 32, 64, 128],
                           "train.seed": list(range(seeds))}},
    }


def one_failed_one_diverged(trial: Trial) -> str:
    cfg = trial.config
    if cfg.loss.kind == "sigmoid" and cfg.train.batch_size == 128 and cfg.train.seed == 0:
        return "diverged"
    if cfg.loss.kind == "softmax" and cfg.train.batch_size == 16 and cfg.train.seed == 1:
        return "failed"
    return "done"


def seeds_frame(values: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame({"loss.kind": ["sigmoid"] * len(values), "acc": values})


def test_the_bootstrap_interval_contains_the_seed_mean_and_narrows_with_more_seeds():
    widths = []
    for seeds in (3, 10, 40):
        # The same spread of seed results each time, only more of them.
        stats = seed_stats(seeds_frame(np.linspace(0.4, 0.6, seeds)), ["loss.kind"], "acc").row(0, named=True)
        assert stats["n"] == seeds
        assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"]
        widths.append(stats["ci_high"] - stats["ci_low"])
    assert widths[0] > widths[1] > widths[2] > 0


def test_one_seed_gives_a_zero_width_interval_at_its_value():
    stats = seed_stats(seeds_frame(np.array([0.3])), ["loss.kind"], "acc").row(0, named=True)
    assert stats["ci_low"] == stats["mean"] == stats["ci_high"] == pytest.approx(0.3)


def test_a_power_law_fit_recovers_the_parameters_that_made_the_data():
    rng = np.random.default_rng(1)
    batch = np.repeat([8, 16, 32, 64, 128, 256, 512, 1024], 5)
    y_inf, c, alpha = 0.62, 0.6, 0.5
    fit = fit_power_law(batch, y_inf - c * batch ** -alpha + rng.normal(0, 0.003, batch.size))
    assert fit.y_inf == pytest.approx(y_inf, abs=0.01)
    assert fit.c == pytest.approx(c, rel=0.15)
    assert fit.alpha == pytest.approx(alpha, abs=0.08)
    assert fit.r2 > 0.99


def test_a_fit_reports_where_the_curve_saturates_with_a_band_around_the_truth():
    rng = np.random.default_rng(2)
    batch = np.repeat([16, 32, 64, 128, 256, 512], 4)
    truth = 0.3 - 0.4 * batch ** -1.0  # within 1 pp of 0.3 from B = 0.4 / 0.01 = 40 on
    result = fit_with_bands("sigmoid", batch, truth + rng.normal(0, 0.002, batch.size))
    assert isinstance(result, FitSummary)
    assert result.saturation_ci[0] <= 40 <= result.saturation_ci[1]
    assert np.all(result.band_low <= result.band_high)
    assert "saturates" in result.describe() and "B ≈" in result.describe()


def test_too_few_batch_sizes_give_a_message_instead_of_a_curve():
    result = fit_with_bands("softmax", np.array([16, 16, 32, 32, 64, 64]),
                            np.array([0.1, 0.11, 0.2, 0.21, 0.3, 0.31]))
    assert isinstance(result, FitFailure)
    assert result.reason.startswith("3 distinct batch sizes (16, 32, 64)")
    assert "at least 4" in result.reason and "sweep.grid.train.batch_size" in result.reason


def test_a_curve_that_rises_then_falls_is_not_forced_into_a_power_law():
    batch = np.array([16, 32, 64, 128, 256, 512])
    result = fit_with_bands("sigmoid", batch, np.array([0.1, 0.3, 0.5, 0.5, 0.3, 0.1]))
    assert isinstance(result, FitFailure) and "R²" in result.reason


def test_a_curve_still_straight_in_log_batch_gets_no_asymptote_from_extrapolation():
    # Accuracy falling by 3 pp per doubling, as at a small fixed budget: no saturation in sight.
    batch = np.repeat([16, 32, 64, 128, 256, 512], 3)
    rng = np.random.default_rng(3)
    result = fit_with_bands("sigmoid", batch, 0.25 - 0.03 * np.log2(batch / 16)
                            + rng.normal(0, 0.005, batch.size))
    assert isinstance(result, FitFailure)
    assert "linearly in log B" in result.reason and "train.examples_seen" in result.reason


def test_the_report_renders_a_store_with_failed_and_diverged_trials_and_counts_them(tmp_path):
    store = write_synthetic_run(tmp_path, batch_study(), status_of=one_failed_one_diverged)
    assert main(["report", str(store.root), "--exclude-diverged"]) == 0

    out = store.report_dir
    for name in ("accuracy_vs_batch", "retrieval_vs_batch", "instability", "traces", "grad_norm"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.svg").stat().st_size > 0
    groups = pl.read_csv(out / "groups.csv")
    row = groups.filter((pl.col("loss.kind") == "softmax") & (pl.col("train.batch_size") == 16))
    assert row.select("trials", "done", "failed").row(0) == (2, 1, 1)
    row = groups.filter((pl.col("loss.kind") == "sigmoid") & (pl.col("train.batch_size") == 128))
    assert row.select("trials", "done", "diverged").row(0) == (2, 1, 1)
    page = (out / "index.html").read_text()
    assert "16 trials: 14 done, 1 diverged, 1 failed" in page
    assert "diverged seeds are excluded from the curves" in page
    assert "<img src='accuracy_vs_batch.png'" in page and "http" not in page
    assert "sigmoid beats softmax" in page  # the synthetic truth: sigmoid ahead at small batch
    assert len(pl.read_csv(out / "results.csv")) == 16


def test_excluding_diverged_seeds_changes_the_curve_but_not_the_counts(tmp_path):
    store = write_synthetic_run(tmp_path, batch_study(), status_of=one_failed_one_diverged)
    point = (pl.col("loss.kind") == "sigmoid") & (pl.col("train.batch_size") == 128)
    included = aggregate(store.root, AXES, include_diverged=True)
    excluded = aggregate(store.root, AXES, include_diverged=False)
    with_it = included.curves["zeroshot_top1"].filter(point).row(0, named=True)
    without = excluded.curves["zeroshot_top1"].filter(point).row(0, named=True)
    assert (with_it["n"], without["n"]) == (2, 1)
    assert with_it["mean"] != pytest.approx(without["mean"])
    assert included.counts.equals(excluded.counts)
    assert included.instability.equals(excluded.instability)
    assert "diverged seeds are included in the curves" in counts_line(included)


def test_fits_need_four_batch_sizes_and_the_findings_say_so(tmp_path):
    store = write_synthetic_run(tmp_path, batch_study(sizes=[16, 32, 64]))
    agg = aggregate(store.root, AXES, n_boot=200)
    text = "\n".join(findings(agg, accuracy_fits(agg)))
    assert "softmax: no fit — 3 distinct batch sizes (16, 32, 64)" in text


def test_a_fit_on_a_synthetic_store_recovers_the_true_asymptotes(tmp_path):
    study = batch_study(sizes=[16, 64, 256, 1024, 4096], seeds=3)
    store = write_synthetic_run(tmp_path, study)
    agg = aggregate(store.root, AXES, n_boot=200)
    for kind, (y_inf, _, _) in TRUTH.items():
        trials = agg.trials.filter(pl.col("loss.kind") == kind)
        fit = fit_power_law(trials["train.batch_size"].to_numpy(), trials["zeroshot_top1"].to_numpy())
        assert fit.y_inf == pytest.approx(y_inf, abs=0.03)


def test_an_init_sweep_gets_the_heatmap_and_the_early_loss_figure(tmp_path):
    study = {
        "name": "inits",
        "base": {"loss": {"kind": "sigmoid"}, "train": {"examples_seen": 640, "batch_size": 64}},
        "sweep": {"grid": {"loss.temperature_init": [1.0, 10.0], "train.seed": [0, 1]},
                  "zip": {"loss.bias_init": [-10.0, "neg_log_batch", None],
                          "loss.use_bias": [True, True, False]}},
    }
    store = write_synthetic_run(tmp_path, study)
    agg = aggregate(store.root, store.manifest().axes, n_boot=200)
    assert figures.has_init_grid(agg.layout)
    paths = figures.plot_init_heatmap(agg, tmp_path) + figures.plot_early_loss(agg, tmp_path)
    assert [p.name for p in paths] == ["init_sensitivity.png", "init_sensitivity.svg",
                                       "early_loss.png", "early_loss.svg"]
    assert all(p.stat().st_size > 0 for p in paths)
    svg = (tmp_path / "init_sensitivity.svg").read_text()
    assert "no bias" in svg and "−log B" in svg


def test_the_step_frame_reads_trials_with_and_without_extended_monitors_and_all_null_bias(tmp_path: Path):
    store = write_synthetic_run(tmp_path, batch_study(sizes=[16, 32]))
    ids = store.trial_ids()
    # A trial logged without the extended monitors, as softmax with bias all null: a narrower part.
    part = store.trial(ids[0]).metric_parts()[0]
    pl.read_parquet(part).drop("rms_max").with_columns(pl.lit(None).alias("bias")).write_parquet(part)
    steps = scan_steps(store.root, ids).collect()
    assert set(steps["trial_id"]) == set(ids)
    assert steps.filter(pl.col("trial_id") == ids[0])["rms_max"].null_count() > 0
    expected = sum(len(pl.read_parquet(store.trial(t).metric_parts()[0])) for t in ids)
    assert steps.height == expected


def test_a_trial_with_overlapping_metric_parts_counts_each_step_once(tmp_path: Path):
    store = write_synthetic_run(tmp_path, batch_study(sizes=[16, 32]))
    trial = store.trial(store.trial_ids()[0])
    whole = pl.read_parquet(trial.metric_parts()[0])
    trial.metric_parts()[0].unlink()
    # A resume killed between writing the truncated part and deleting the old one leaves both.
    whole.head(40).write_parquet(trial.metrics_dir / "000000001-000000040.parquet")
    whole.head(30).write_parquet(trial.metrics_dir / "000000001-000000030.parquet")
    whole.slice(30).write_parquet(trial.metrics_dir / f"000000031-{whole.height:09d}.parquet")
    steps = scan_steps(store.root, [trial.trial_id]).collect()
    assert steps["step"].to_list() == whole["step"].to_list()

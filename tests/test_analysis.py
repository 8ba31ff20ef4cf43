"""Analysis: Student-t intervals and paired, Holm-corrected comparisons over seeds; power-law fits;
the loss-spike analyses (event-triggered RMS, the RMS predictor against shuffled spike times, knob
effects); and the report on stores with failed, diverged, stalled and spiking trials (synthetic
stores written with the store's own writers, with known answers; nothing trains here)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalestudy.analysis import figures
from scalestudy.analysis.aggregate import aggregate, scan_evals, scan_steps, seed_stats
from scalestudy.analysis.compare import compare
from scalestudy.analysis.fits import (
    FitFailure,
    FitSummary,
    fit_power_law,
    fit_with_bands,
)
from scalestudy.analysis.instability import (
    alarm_ids,
    eligible_steps,
    event_triggered_average,
    in_store_order,
    knob_effects,
    loss_spike_onsets,
    prediction_counts,
    sample_distinct,
    shuffled_counts,
    spike_analysis,
)
from scalestudy.analysis.report import accuracy_fits
from scalestudy.analysis.stats import (
    betainc,
    fisher_exact,
    holm,
    mcnemar_exact,
    paired_test,
    t_quantile,
    t_sf2,
    welch_test,
    wilson,
)
from scalestudy.analysis.summary import counts_line, findings, loss_comparisons, verdict
from scalestudy.analysis.synthetic import (
    TRUTH,
    PlantedSpikes,
    duplicate_rate,
    write_synthetic_run,
)
from scalestudy.cli import main
from scalestudy.expand import Trial
from tests.conftest import checkout_env

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


# ---------------------------------------------------------------- statistics

def t_two_sided_closed_form(t: float, df: int) -> float:
    """P(|T| ≥ t) for integer df by the finite series of Abramowitz & Stegun 26.7.3–4: the naive
    reference the continued-fraction implementation is checked against."""
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df == 1:
        inside = 2 * theta / math.pi
    elif df % 2:
        coef, total = 1.0, c
        for k in range(1, (df - 3) // 2 + 1):
            coef *= 2 * k / (2 * k + 1)
            total += coef * c ** (2 * k + 1)
        inside = 2 / math.pi * (theta + s * total)
    else:
        coef, total = 1.0, 1.0
        for k in range(1, (df - 2) // 2 + 1):
            coef *= (2 * k - 1) / (2 * k)
            total += coef * c ** (2 * k)
        inside = s * total
    return 1 - inside


@given(t=st.floats(0, 60), df=st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_the_t_distribution_matches_the_closed_form_series_for_integer_degrees_of_freedom(t, df):
    assert t_sf2(t, df) == pytest.approx(t_two_sided_closed_form(t, df), abs=1e-12)


@pytest.mark.parametrize(("df", "quantile"), [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764),
                                              (9, 2.2622), (29, 2.0452), (120, 1.9799)])
def test_the_975_percent_t_quantile_is_the_textbook_table_value(df, quantile):
    assert t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)
    assert t_sf2(t_quantile(0.975, df), df) == pytest.approx(0.05, abs=1e-10)


@given(a=st.floats(0.1, 30), x=st.floats(0, 1))
@settings(max_examples=100, deadline=None)
def test_the_incomplete_beta_function_matches_its_closed_forms(a, x):
    # I_x(a, 1) = x^a and I_x(1, b) = 1 − (1 − x)^b (integrate the beta density by hand).
    assert betainc(a, 1.0, x) == pytest.approx(x ** a, abs=1e-12)
    assert betainc(1.0, a, x) == pytest.approx(1 - (1 - x) ** a, abs=1e-12)


def test_a_95_percent_t_interval_over_three_seeds_covers_the_true_mean_95_percent_of_the_time():
    # 4,000 studies of 3 normal seeds each: coverage within 3 binomial SE (±1.0 pp) of 95 %.
    rng = np.random.default_rng(0)
    seeds = rng.normal(0.4, 0.03, (4000, 3))
    frame = pl.DataFrame({"study": np.repeat(np.arange(4000), 3), "acc": seeds.ravel()})
    stats = seed_stats(frame, ["study"], "acc")
    covered = ((stats["ci_low"] <= 0.4) & (stats["ci_high"] >= 0.4)).mean()
    assert abs(covered - 0.95) < 3 * math.sqrt(0.95 * 0.05 / 4000)


def test_seed_statistics_are_the_textbook_t_interval_per_group():
    frame = pl.DataFrame({"loss.kind": ["a"] * 3 + ["b"] * 5,
                          "acc": [0.1, 0.2, 0.3, 0.5, 0.5, 0.6, 0.7, 0.7]})
    stats = {r["loss.kind"]: r for r in seed_stats(frame, ["loss.kind"], "acc").iter_rows(named=True)}
    # a: mean 0.2, s = 0.1, t(0.975, 2) = 4.3027 → ± 0.24841.
    assert (stats["a"]["ci_low"], stats["a"]["ci_high"]) == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6)
    x = np.array([0.5, 0.5, 0.6, 0.7, 0.7])
    half = 2.776445 * x.std(ddof=1) / math.sqrt(5)
    assert (stats["b"]["ci_low"], stats["b"]["ci_high"]) == pytest.approx((x.mean() - half, x.mean() + half), abs=1e-6)


def test_the_interval_contains_the_seed_mean_and_narrows_with_more_seeds():
    widths = []
    for seeds in (2, 3, 10, 40):
        # The same spread of seed results each time, only more of them.
        stats = seed_stats(seeds_frame(np.linspace(0.4, 0.6, seeds)), ["loss.kind"], "acc").row(0, named=True)
        assert stats["n"] == seeds
        assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"]
        widths.append(stats["ci_high"] - stats["ci_low"])
    assert widths[0] > widths[1] > widths[2] > widths[3] > 0


def test_one_seed_has_no_interval_rather_than_a_zero_width_one():
    stats = seed_stats(seeds_frame(np.array([0.3])), ["loss.kind"], "acc").row(0, named=True)
    assert stats["mean"] == pytest.approx(0.3) and stats["n"] == 1
    assert stats["ci_low"] is None and stats["ci_high"] is None


def test_a_paired_test_is_the_hand_computed_one():
    # Differences 1, 2, 3: mean 2, s = 1, t = 2√3 with 2 df; P(|T| ≥ t) = 1 − t/√(2 + t²) for 2 df.
    test = paired_test([11.0, 12.0, 13.0], [10.0, 10.0, 10.0], 0.95)
    t = 2 * math.sqrt(3)
    assert test.n == 3 and test.mean == pytest.approx(2.0)
    assert test.p == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    assert (test.low, test.high) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)), abs=1e-6)


def test_pairing_by_seed_removes_the_seed_to_seed_scatter_both_settings_share():
    # Seeds differ by ±5 pp, sigmoid is 1 pp ahead of softmax on every seed (± 0.1 pp).
    rng = np.random.default_rng(1)
    luck = rng.normal(0, 0.05, 5)
    softmax = 0.40 + luck + rng.normal(0, 0.001, 5)
    sigmoid = 0.41 + luck + rng.normal(0, 0.001, 5)
    paired, unpaired = paired_test(sigmoid, softmax, 0.95), welch_test(sigmoid, softmax, 0.95)
    assert paired.excludes_zero and paired.low < 0.01 < paired.high and paired.p < 0.001
    assert not unpaired.excludes_zero  # the same data, compared as if unpaired: lost in the luck


def test_holm_adjusts_p_values_as_the_textbook_procedure():
    # Sorted 0.01, 0.02, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.04, 0.06, 0.06, 0.04 → monotone: 0.04, 0.06, 0.06, 0.06.
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]


@given(st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_holm_never_lowers_a_p_value_keeps_their_order_and_never_exceeds_bonferroni(ps):
    adjusted = holm(ps)
    m = len(ps)
    for p, q in zip(ps, adjusted):
        assert p <= q + 1e-15 and q <= min(1.0, m * p) + 1e-15
    for (p1, q1), (p2, q2) in zip(sorted(zip(ps, adjusted)), sorted(zip(ps, adjusted))[1:]):
        assert q1 <= q2 + 1e-15


def test_fractions_and_binary_outcomes_get_the_hand_computed_intervals_and_exact_tests():
    z2 = 1.959964 ** 2
    assert wilson(0, 10, 0.95) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-6)
    assert wilson(10, 10, 0.95) == pytest.approx((10 / (10 + z2), 1.0), abs=1e-6)
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 2 ** 5)  # all 5 discordant pairs one way
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert fisher_exact(5, 5, 0, 5) == pytest.approx(2 / math.comb(10, 5))


def test_a_comparison_says_inconclusive_when_its_interval_contains_zero_or_holm_undoes_it():
    frame = pl.DataFrame({
        "loss.kind": ["sigmoid", "softmax"] * 6, "train.batch_size": [16] * 6 + [256] * 6,
        "train.seed": [0, 0, 1, 1, 2, 2] * 2,
        # B = 16: +2 pp on every seed (± 0.1); B = 256: +1, −1, +0.5 pp.
        "acc": [0.42, 0.40, 0.521, 0.50, 0.459, 0.44, 0.31, 0.30, 0.29, 0.30, 0.305, 0.30]})
    rows = compare(frame, "loss.kind", "sigmoid", "softmax", "acc", ["train.batch_size"], ["train.seed"])
    small, large = rows.row(0, named=True), rows.row(1, named=True)
    assert small["paired"] and small["n"] == 3 and small["diff"] == pytest.approx(0.02, abs=1e-3)
    assert small["p_holm"] == pytest.approx(min(1, 2 * min(small["p"], large["p"])))
    assert verdict(small, "sigmoid", "softmax", 2) == "sigmoid ahead"
    assert verdict(large, "sigmoid", "softmax", 2) == "inconclusive: the interval contains 0"
    # An interval clear of 0 whose p-value does not survive Holm's correction is no finding either.
    borderline = {**small, "p": 0.04, "p_holm": 0.08}
    assert verdict(borderline, "sigmoid", "softmax", 2).startswith("inconclusive after correcting for 2")


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


SHAPE_WORDS = ("straight", "linear", "rises", "falls", "saturates", "monotone")


@pytest.mark.parametrize("shape", ["log-linear", "step", "flat"])
def test_an_exponent_at_the_edge_of_the_fit_grid_is_no_fit_and_claims_no_shape(shape):
    batch = np.repeat([16, 32, 64, 128, 256, 512], 3)
    rng = np.random.default_rng(3)
    y = {"log-linear": 0.25 - 0.03 * np.log2(batch / 16),  # as at a small fixed budget
         "step": np.where(batch > 16, 0.5, 0.1),  # all the change between the first two sizes
         "flat": np.full(batch.size, 0.3)}[shape] + rng.normal(0, 0.005, batch.size)
    result = fit_with_bands("sigmoid", batch, y)
    assert isinstance(result, FitFailure)
    text = result.describe()
    assert text.startswith("sigmoid: no fit — ")
    assert not any(word in text for word in SHAPE_WORDS), text
    if shape != "flat":  # a flat curve may instead fail on R² (nothing to explain)
        assert "edge of the fit grid" in text


def test_a_tiny_exponent_inside_the_grid_reports_no_asymptote_and_says_why():
    batch = np.repeat([16, 32, 64, 128, 256, 512], 3)
    rng = np.random.default_rng(4)
    # α = 0.03: the curve would come within 1 pp of its asymptote only at B ≈ (1 / 0.01)^(1/0.03).
    result = fit_with_bands("softmax", batch, 0.9 - 1.0 * batch ** -0.03 + rng.normal(0, 0.0005, batch.size))
    assert isinstance(result, FitFailure)
    assert "below 0.05" in result.reason and "beyond B = 51,200" in result.reason
    assert "train.examples_seen" in result.reason
    assert not any(word in result.describe() for word in SHAPE_WORDS)


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
    # Two seeds, one of them lost at B = 16 (failed) and B = 128 (diverged, excluded): one pair
    # there, so no interval and no claim, however large the gap looks.
    assert "B=16: sigmoid − softmax = " in page
    assert "1 seed pairs): inconclusive: fewer than two pairs, no interval" in page
    assert "Student-t" in page and "bootstrap CIs over seeds" not in page
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
    agg = aggregate(store.root, AXES)
    text = "\n".join(findings(agg, accuracy_fits(agg)))
    assert "softmax: no fit — 3 distinct batch sizes (16, 32, 64)" in text


def test_a_fit_on_a_synthetic_store_recovers_each_asymptote_closely_enough_to_order_them(tmp_path):
    # The two true asymptotes are 2 pp apart (TRUTH: 0.60 and 0.62), so a fit must land within
    # gap / 2 = 1 pp of each for the two never to be confused. With 7 batch sizes up to 65,536 and
    # 12 seeds, the fitted asymptote's sd over 400 simulated studies of this design and noise model
    # (seed-shared 0.89 pp + own 0.45 pp) is 0.28 pp, so 1 pp is 3.6 sd (the 99.9th percentile of
    # the error there was 0.94 pp); with 5 sizes × 3 seeds the sd was 0.95 pp and no tolerance
    # below the gap would do.
    study = batch_study(sizes=[16, 64, 256, 1024, 4096, 16384, 65536], seeds=12)
    store = write_synthetic_run(tmp_path, study)
    trials = pl.read_parquet(store.results_path)
    fitted = {}
    for kind, (y_inf, _, _) in TRUTH.items():
        rows = trials.filter(pl.col("loss.kind") == kind)
        fitted[kind] = fit_power_law(rows["train.batch_size"].to_numpy(),
                                     rows["zeroshot_top1"].to_numpy()).y_inf
        assert fitted[kind] == pytest.approx(y_inf, abs=(TRUTH["sigmoid"][0] - TRUTH["softmax"][0]) / 2)
    assert fitted["sigmoid"] > fitted["softmax"]


def test_an_init_sweep_gets_the_heatmap_and_the_early_loss_figure(tmp_path):
    study = {
        "name": "inits",
        "base": {"loss": {"kind": "sigmoid"}, "train": {"examples_seen": 640, "batch_size": 64}},
        "sweep": {"grid": {"loss.temperature_init": [1.0, 10.0], "train.seed": [0, 1]},
                  "zip": {"loss.bias_init": [-10.0, "neg_log_batch", None],
                          "loss.use_bias": [True, True, False]}},
    }
    store = write_synthetic_run(tmp_path, study)
    agg = aggregate(store.root, store.manifest().axes)
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


# ---------------------------------------------------------------- comparisons, evaluations, stalls

def test_with_five_seeds_the_paired_comparison_finds_sigmoids_lead_and_lands_near_the_truth(tmp_path):
    store = write_synthetic_run(tmp_path, batch_study(seeds=5))
    agg = aggregate(store.root, AXES)
    text = "\n".join(findings(agg, []))
    rows = loss_comparisons(agg)
    assert rows.height == 4 and rows["paired"].all() and (rows["n"] == 5).all()
    # A pair's difference has only the trials' own noise (the seed's share cancels):
    # sd = 1 pp × √(2 × 0.2); the mean of 5 pairs is within 4 of its SE of the truth.
    tolerance = 4 * 0.01 * math.sqrt(0.4) / math.sqrt(5)
    for row in rows.iter_rows(named=True):
        truth = (TRUTH["sigmoid"][0] - TRUTH["sigmoid"][1] * row["train.batch_size"] ** -0.5) - (
            TRUTH["softmax"][0] - TRUTH["softmax"][1] * row["train.batch_size"] ** -0.5)
        assert row["diff"] == pytest.approx(truth, abs=tolerance)
    assert "Holm-adjusted over the 4 B values" in text
    assert "B=16: sigmoid − softmax = +9." in text and "5 seed pairs): sigmoid ahead" in text


def eval_study(name: str = "evals", seeds: int = 3) -> dict:
    return {"name": name,
            "base": {"train": {"examples_seen": 64 * 200, "eval_every": 50}},
            "sweep": {"grid": {"loss.kind": ["softmax", "sigmoid"], "train.batch_size": [64, 128],
                               "train.seed": list(range(seeds))}}}


def test_accuracy_during_training_is_averaged_over_seeds_per_step_with_t_bands(tmp_path):
    store = write_synthetic_run(tmp_path, eval_study())
    agg = aggregate(store.root, AXES)
    evals = scan_evals(store.root, store.trial_ids()).collect()
    assert set(evals["trial_id"]) == set(store.trial_ids())
    assert list(dict.fromkeys(agg.evals["metric"])) == [
        "zeroshot_top1", "zeroshot_top1_colour", "zeroshot_top1_shape", "linear_probe_top1"]
    setting = (pl.col("loss.kind") == "sigmoid") & (pl.col("train.batch_size") == 64)
    curve = agg.evals.filter(setting & (pl.col("metric") == "zeroshot_top1")).sort("step")
    # B = 64: 200 steps, evaluated every 50; B = 128: 100 steps (50 and 100).
    assert curve["step"].to_list() == [50, 100, 150, 200] and (curve["n"] == 3).all()
    assert curve["examples_seen"].to_list() == [3200, 6400, 9600, 12800]
    # The last evaluation is each trial's result: the same mean and interval as the final curve.
    final = agg.curves["zeroshot_top1"].filter(setting).row(0, named=True)
    assert curve.row(-1, named=True)["mean"] == pytest.approx(final["mean"])
    assert curve.row(-1, named=True)["ci_low"] == pytest.approx(final["ci_low"])
    paths = (figures.plot_eval_curves(agg, tmp_path, "examples_seen")
             + figures.plot_eval_curves(agg, tmp_path, "step"))
    assert [p.name for p in paths] == ["accuracy_vs_examples.png", "accuracy_vs_examples.svg",
                                       "accuracy_vs_steps.png", "accuracy_vs_steps.svg"]
    svg = (tmp_path / "accuracy_vs_steps.svg").read_text()
    assert "zero-shot top-1, colour" in svg and "linear-probe top-1" in svg and "Student-t" in svg


def test_stalled_settings_and_duplicate_caption_rates_reach_the_groups_table_and_findings(tmp_path):
    def stalls(trial: Trial) -> bool:  # sigmoid at B = 128 learns nothing, every seed
        return trial.config.loss.kind == "sigmoid" and trial.config.train.batch_size == 128

    store = write_synthetic_run(tmp_path, eval_study("stalls", seeds=2), stalled_of=stalls)
    assert main(["report", str(store.root)]) == 0
    groups = pl.read_csv(store.report_dir / "groups.csv")
    assert groups.filter(pl.col("stalled") > 0).select("loss.kind", "train.batch_size").rows() == [
        ("sigmoid", 128)]
    for row in groups.iter_rows(named=True):
        assert row["dup_caption_rate"] == pytest.approx(duplicate_rate(row["train.batch_size"]), abs=0.01)
    page = (store.report_dir / "index.md").read_text()
    assert "Stalled — final loss within 2 % of the no-learning loss" in page
    assert "sigmoid, B=128: 2 of 2 (no-learning loss 5.85)" in page  # log 128 + 127·log(128/127)
    assert "## Stalled trials per setting" in page
    assert (store.report_dir / "training_curves.png").stat().st_size > 0


@pytest.mark.parametrize("shape", ["one trial", "every trial failed", "no batch axis"])
def test_the_report_renders_every_study_shape(tmp_path, shape):
    study = {"one trial": {"name": "one", "base": {"train": {"examples_seen": 640, "eval_every": 4}}},
             "every trial failed": batch_study("failed", sizes=[16, 32], seeds=1),
             "no batch axis": {"name": "nobatch", "base": {"train": {"examples_seen": 640}},
                               "sweep": {"grid": {"loss.kind": ["softmax", "sigmoid"],
                                                  "train.seed": [0, 1, 2]}}}}[shape]
    status = (lambda trial: "failed") if shape == "every trial failed" else (lambda trial: "done")
    store = write_synthetic_run(tmp_path, study, status_of=status)
    assert main(["report", str(store.root)]) == 0
    page = (store.report_dir / "index.md").read_text()
    assert "## Summary" in page and (store.report_dir / "accuracy_vs_batch.png").exists()
    if shape == "no batch axis":
        assert "overall: sigmoid − softmax = " in page and "3 seed pairs" in page
    if shape == "one trial":
        assert "one seed, no interval" in page


# ---------------------------------------------------------------- loss spikes and the update RMS

def spike_study(name: str = "spiky", seeds: int = 5) -> dict:
    return {"name": name,
            "base": {"train": {"examples_seen": 64 * 1500, "batch_size": 64}},
            "sweep": {"grid": {"optim.beta2": [0.95, 0.999], "train.seed": list(range(seeds))}}}


def spikes_by_beta2(trial: Trial) -> float:
    """The planted truth: 6 loss spikes per 1,000 steps at β2 = 0.999, 2 at 0.95."""
    return 6.0 if trial.config.optim.beta2 > 0.99 else 2.0


def test_spikes_planted_three_steps_after_rms_bumps_are_predicted_and_the_shuffled_control_is_chance(tmp_path):
    planted = PlantedSpikes(spikes_by_beta2, decoys_per_1k=4.0)
    store = write_synthetic_run(tmp_path, spike_study(), spikes=planted)
    agg = aggregate(store.root, store.manifest().axes)
    spikes = agg.spikes
    assert spikes is not None and spikes.trials == 10
    # One flagged step per planted spike (the detector's own flags), one onset each.
    assert spikes.events == int(agg.trials["loss_spike_count"].sum()) > 0
    table = {r["threshold"]: r for r in spikes.prediction.iter_rows(named=True)}
    for r in (1.5, 2.0, 3.0):  # below the bump (4): every spike's bump is an alarm that comes true
        row = table[r]
        assert row["recall"] == 1.0 and row["true_alarms"] == row["onsets"]
        # The other alarms are the decoys: precision = spikes / (spikes + decoys).
        assert row["alarms"] > row["onsets"] and row["precision"] == row["onsets"] / row["alarms"]
        assert row["p_value"] == pytest.approx(1 / 201)  # no shuffle catches them all
    assert table[5.0]["alarms"] == 0 and table[5.0]["recall"] == 0.0  # above the bump: silent
    # The control, against its exact expectation: a shuffled onset lands on one of a trial's K
    # firing steps with probability K / N, so E[recall] = Σ k·K/N / Σ k over trials.
    counts = prediction_counts(eligible_steps(scan_steps(store.root, store.trial_ids())))
    expected = (counts.onsets * counts.covered[0] / counts.eligible).sum() / counts.onsets.sum()
    assert table[1.5]["control_recall"] == pytest.approx(expected, rel=0.05)
    assert table[1.5]["control_precision"] < 0.25 * table[1.5]["precision"]
    # The event-triggered average shows the bump exactly `lead` steps before the onset.
    eta = spikes.eta
    peak = eta.row(int(eta["rms_max"].arg_max()), named=True)
    assert peak["offset"] == -planted.lead and peak["rms_max"] == pytest.approx(planted.bump)
    assert eta.filter(pl.col("offset") == 0)["rms_max"][0] == pytest.approx(0.9, abs=0.05)
    assert spikes.before_onsets[0] == pytest.approx(planted.bump)


def test_spikes_without_rms_bumps_are_predicted_no_better_than_shuffled_spike_times(tmp_path):
    # The negative control: the same spikes and as many bumps, but the bumps are unrelated to them.
    planted = PlantedSpikes(spikes_by_beta2, bumps=False, decoys_per_1k=8.0)
    store = write_synthetic_run(tmp_path, spike_study("unrelated"), spikes=planted)
    agg = aggregate(store.root, store.manifest().axes)
    row = agg.spikes.prediction.row(0, named=True)
    assert row["caught"] == 0 and row["true_alarms"] == 0  # decoys sit clear of every spike
    assert row["p_value"] == 1.0
    text = "\n".join(findings(agg, []))
    assert "at no threshold does rms_max predict loss spikes better than shuffled spike times" in text


def test_knob_effects_recover_the_planted_spike_rates_and_count_divergence_exactly(tmp_path):
    def diverge(trial: Trial) -> str:  # 4 of 5 seeds diverge at β2 = 0.999, none at 0.95
        return "diverged" if trial.config.optim.beta2 > 0.99 and trial.config.train.seed < 4 else "done"

    store = write_synthetic_run(tmp_path, spike_study("knobs"), spikes=PlantedSpikes(spikes_by_beta2),
                                status_of=diverge)
    agg = aggregate(store.root, store.manifest().axes)
    effects = {r["metric"]: r for r in agg.knobs.effects.iter_rows(named=True)}
    rate = effects["loss_spike_rate_per_1k"]
    assert rate["knob"] == "optim.beta2" and (rate["value"], rate["reference"]) == ("0.999", "0.95")
    assert rate["paired"] and rate["n"] == 5 and rate["ci_low"] < 4.0 < rate["ci_high"]
    diverged = effects["diverged"]
    assert (diverged["count_value"], diverged["count_reference"]) == (4, 0)
    assert diverged["p"] == pytest.approx(2 / 2 ** 4)  # exact McNemar: 4 discordant pairs, one way
    levels = agg.knobs.levels.filter(pl.col("metric") == "diverged").sort("value")
    assert levels["mean"].to_list() == [0.0, 0.8]
    text = "\n".join(findings(agg, []))
    assert "β2 = 0.999 against β2 = 0.95: loss spikes per 1,000 steps +" in text
    assert "diverged 4 vs 0 of 5 pairs (exact McNemar p = 0.12" in text and "): inconclusive" in text


def test_a_study_with_loss_spikes_gets_the_instability_figures_and_numbers_in_its_findings(tmp_path):
    store = write_synthetic_run(tmp_path, spike_study("report", seeds=2),
                                spikes=PlantedSpikes(spikes_by_beta2))
    assert main(["report", str(store.root)]) == 0
    out = store.report_dir
    for name in ("spike_rms", "spike_prediction", "instability_knobs", "training_curves"):
        assert (out / f"{name}.png").stat().st_size > 0, name
    page = (out / "index.md").read_text()
    assert "The largest rms_max in the 8 steps before an onset averaged 4.00" in page
    assert "r = 2: recall 100 % (shuffled" in page
    assert "So rms_max above r = 1.5, 2, 3 predicts loss spikes better than shuffled spike times" in page
    # A study without loss spikes draws none of the spike figures.
    plain = write_synthetic_run(tmp_path / "plain", spike_study("plain", seeds=2))
    assert main(["report", str(plain.root)]) == 0
    assert not (plain.report_dir / "spike_rms.png").exists()


def run_recipe(study: str, run_dir: Path, out: Path) -> list[str]:
    """analysis/<study>/recipe.py as a reader runs it; returns the names it wrote into `out`."""
    recipe = Path(__file__).parents[1] / "analysis" / study / "recipe.py"
    done = subprocess.run([sys.executable, str(recipe), str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=240, env=checkout_env())
    assert done.returncode == 0, done.stderr
    return sorted(p.name for p in out.iterdir())


def test_the_instability_recipe_exports_the_spike_figures_only_when_there_were_spikes(tmp_path):
    spiky = write_synthetic_run(tmp_path / "a", spike_study("spiky", seeds=2),
                                spikes=PlantedSpikes(spikes_by_beta2))
    out = tmp_path / "figures"
    assert "spike_prediction.png" in run_recipe("instability", spiky.root, out)
    assert "## Figures not drawn" not in (out / "findings.md").read_text()
    # The same folder re-exported from a study without spikes: no stale spike figure stays.
    plain = write_synthetic_run(tmp_path / "b", spike_study("plain", seeds=2))
    names = run_recipe("instability", plain.root, out)
    assert names == ["findings.md", "instability.png", "instability_knobs.png", "traces.png",
                     "training_curves.png"]
    text = (out / "findings.md").read_text()
    assert "- spike_rms was not drawn: no trial had a loss spike" in text


def naive_counts(steps: pl.DataFrame, r: float, lookback: int) -> dict[str, int]:
    """The prediction counts by the definitions, one step at a time (the plain reference)."""
    out = {"eligible": 0, "onsets": 0, "covered": 0, "alarms": 0, "caught": 0, "true": 0}
    for _, trial in steps.sort("trial_id", "step").group_by(["trial_id"], maintain_order=True):
        rms = dict(zip(trial["step"], trial["rms_max"]))
        flags = dict(zip(trial["step"], trial["is_loss_spike"]))
        first = min(rms)
        firing_before, alarm, alarm_true = False, 0, set()
        previous = None  # the trial's previous recorded step
        for step in sorted(rms):
            onset = bool(flags[step]) and not (previous is not None and bool(flags[previous]))
            previous = step
            window = [rms[s] for s in range(step - lookback, step) if rms.get(s) is not None]
            if step - first < lookback or not window:
                continue
            firing = max(window) > r
            if firing and not firing_before:
                alarm += 1
                out["alarms"] += 1
            out["eligible"] += 1
            out["onsets"] += onset
            out["covered"] += firing
            out["caught"] += firing and onset
            if firing and onset:
                alarm_true.add(alarm)
            firing_before = firing
        out["true"] += len(alarm_true)
    return out


def random_steps(rng: np.random.Generator, trials: int = 3) -> pl.DataFrame:
    """Per-step rows of a few trials in store order: RMS with excursions and gaps (nulls), runs of
    loss-spike flags (the onset rule), trials starting at step 1 or later (a resumed history)."""
    frames = []
    for t in range(trials):
        n, first = int(rng.integers(5, 60)), int(rng.integers(1, 4))
        rms = np.where(rng.random(n) < 0.15, rng.uniform(1, 6, n), rng.uniform(0.5, 1.2, n))
        frames.append(pl.DataFrame({
            "trial_id": f"t{t}", "step": np.arange(first, first + n),
            "is_loss_spike": rng.random(n) < 0.2,
            "rms_max": [None if rng.random() < 0.1 else float(v) for v in rms],
        }, schema_overrides={"rms_max": pl.Float64}))
    return pl.concat(frames)


def assert_counts_are(counts, steps: pl.DataFrame, thresholds: tuple[float, ...], lookback: int) -> None:
    for i, r in enumerate(thresholds):
        naive = naive_counts(steps, r, lookback)
        assert (int(counts.eligible.sum()), int(counts.onsets.sum())) == (naive["eligible"], naive["onsets"])
        assert int(counts.covered[i].sum()) == naive["covered"]
        assert int(counts.alarms[i].sum()) == naive["alarms"]
        assert int(counts.caught[i].sum()) == naive["caught"]
        assert int(counts.true_alarms[i].sum()) == naive["true"]


@given(seed=st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_the_prediction_counts_equal_a_step_by_step_count_of_the_definitions(seed):
    rng = np.random.default_rng(seed)
    steps = random_steps(rng)
    # Store order: the fast path (windows of rows) is taken, and agrees with the definitions.
    assert in_store_order(steps.lazy())
    fast = prediction_counts(eligible_steps(steps.lazy(), lookback=4, ordered=True), (1.5, 3.0))
    assert_counts_are(fast, steps, (1.5, 3.0), 4)
    # Rows shuffled and a step missing: not store order, so windows are taken by step number.
    gappy = steps.filter(pl.col("step") != int(rng.integers(5, 20))).sample(fraction=1.0, shuffle=True, seed=seed)
    assert not in_store_order(gappy.lazy())
    exact = prediction_counts(eligible_steps(gappy.lazy(), lookback=4, ordered=False), (1.5, 3.0))
    assert_counts_are(exact, gappy, (1.5, 3.0), 4)


def test_shuffled_controls_match_a_literal_permutation_of_each_trials_spike_flags():
    rng = np.random.default_rng(5)
    frames = []
    for t in range(4):
        n = 300
        rms = np.where(rng.random(n) < 0.03, 3.0, 0.9)
        frames.append(pl.DataFrame({"trial_id": f"t{t}", "step": np.arange(1, n + 1),
                                    "is_loss_spike": rng.random(n) < 0.02 * (t + 1), "rms_max": rms}))
    counts = prediction_counts(eligible_steps(pl.concat(frames).lazy()), (2.0,))
    caught, true_alarms = shuffled_counts(counts, n_shuffles=4000, seed=1)
    # The plain way: permute every eligible step's onset flag within the trial, count again.
    plain = np.random.default_rng(2)
    literal_caught, literal_true = [], []
    for _ in range(4000):
        c = a = 0
        for trial_id, before in counts.series:
            k = int(counts.onsets[counts.trial_ids.index(trial_id)])
            flags = plain.permutation(np.arange(before.size) < k)
            ids = alarm_ids(before, 2.0)
            c += int((flags & (ids > 0)).sum())
            a += len(set(ids[flags & (ids > 0)].tolist()))
        literal_caught.append(c)
        literal_true.append(a)
    for fast, literal in ((caught[0], np.array(literal_caught)), (true_alarms[0], np.array(literal_true))):
        se = math.sqrt(fast.var() / fast.size + literal.var() / literal.size)
        assert abs(fast.mean() - literal.mean()) < 4 * se
        assert fast.std() == pytest.approx(literal.std(), rel=0.1)


@given(n=st.integers(1, 200), data=st.data())
@settings(max_examples=50, deadline=None)
def test_sample_distinct_draws_distinct_steps_in_range(n, data):
    k = data.draw(st.integers(0, n))
    rows = sample_distinct(np.random.default_rng(n), n, k, 20)
    assert rows.shape == (20, k)
    assert all(len(set(row.tolist())) == k for row in rows)
    assert rows.size == 0 or (rows.min() >= 0 and rows.max() < n)


def test_sample_distinct_puts_every_step_in_a_sample_equally_often():
    rows = sample_distinct(np.random.default_rng(0), 10, 3, 30_000)
    hits = np.bincount(rows.ravel(), minlength=10) / 30_000
    assert np.allclose(hits, 0.3, atol=4 * math.sqrt(0.3 * 0.7 / 30_000))


def test_loss_spike_onsets_count_a_run_of_flagged_steps_once():
    steps = pl.DataFrame({"trial_id": ["a"] * 6 + ["b"] * 3, "step": [1, 2, 3, 4, 5, 6, 1, 2, 3],
                          "is_loss_spike": [False, True, True, False, True, None, True, True, False]})
    onsets = loss_spike_onsets(steps.lazy()).collect()
    assert onsets.rows() == [("a", 2), ("a", 5), ("b", 1)]
    assert loss_spike_onsets(steps.lazy(), ordered=True).collect().equals(onsets)
    eta = event_triggered_average(
        steps.with_columns(pl.col("step").cast(pl.Float64).alias("rms_max")).lazy(), onsets,
        ["rms_max"], window=1)
    # Offsets −1, 0, +1 around the onsets a:2, a:5, b:1 (b has no step 0).
    assert eta.select("offset", "rms_max_n", "rms_max").rows() == [
        (-1, 2, 2.5), (0, 3, (2 + 5 + 1) / 3), (1, 3, (3 + 6 + 2) / 3)]


def test_knob_effects_fall_back_to_unpaired_tests_when_no_trials_pair():
    ran = pl.DataFrame({"trial_id": list("abcd"), "status": ["done", "diverged", "done", "done"],
                        "optim.kind": ["adamw", "adamw", "stable_adamw", "stable_adamw"],
                        "train.seed": [0, 1, 2, 3], "loss_spike_rate_per_1k": [3.0, 5.0, 1.0, 1.5],
                        "zeroshot_top1": [0.2, 0.1, 0.3, 0.32]})
    effects = {r["metric"]: r for r in
               knob_effects(ran, ["optim.kind", "train.seed"]).effects.iter_rows(named=True)}
    assert not effects["loss_spike_rate_per_1k"]["paired"]
    assert effects["loss_spike_rate_per_1k"]["method"] == "Welch t"
    assert effects["loss_spike_rate_per_1k"]["diff"] == pytest.approx(1.25 - 4.0)
    assert effects["diverged"]["method"] == "Fisher exact"
    assert effects["diverged"]["p"] == pytest.approx(fisher_exact(0, 2, 1, 2))


@pytest.mark.parametrize("module", ["stats", "compare", "aggregate", "fits", "labels"])
def test_the_documented_examples_hold(module):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(f"scalestudy.analysis.{module}")).failed == 0


def test_the_spike_analysis_gives_the_same_answer_on_rows_in_any_order(tmp_path):
    store = write_synthetic_run(tmp_path, spike_study("order", seeds=2),
                                spikes=PlantedSpikes(spikes_by_beta2, decoys_per_1k=4.0))
    ran = pl.read_parquet(store.results_path)
    steps = scan_steps(store.root, ran["trial_id"].to_list())
    fast = spike_analysis(steps, ran)  # store order: windows of rows
    shuffled = steps.collect().sample(fraction=1.0, shuffle=True, seed=3).lazy()
    assert in_store_order(steps) and not in_store_order(shuffled)
    slow = spike_analysis(shuffled, ran)  # sorted, windows by step number
    assert fast is not None and slow is not None
    assert fast.prediction.equals(slow.prediction) and fast.events == slow.events
    # The event-triggered average, both ways, is the plain join of every step to every onset.
    plain = event_triggered_average(steps, loss_spike_onsets(steps).collect(), ["rms_max", "rms_patch_embed"])
    for eta in (fast.eta, slow.eta):
        assert eta.columns == plain.columns
        for column in plain.columns:
            assert eta[column].to_list() == pytest.approx(plain[column].to_list(), nan_ok=True)

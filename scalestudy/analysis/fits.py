"""Saturating power-law fits of a metric against batch size, with bootstrap bands.

The model is y(B) = y_inf − c·B^(−α) with α > 0: the curve approaches its asymptote y_inf as the
batch size B grows, from below when c > 0 (accuracy rising with B, SigLIP Fig. 2) or from above
when c < 0 (e.g. accuracy falling with B at a fixed examples-seen budget, or a loss). The batch
size where it *saturates* is where the gap left to the asymptote, |c|·B^(−α), falls to `tol`
(default 0.01: one percentage point of accuracy): B_sat = (|c| / tol)^(1/α).

Fitting: for a fixed α the model is linear in (y_inf, c), so least squares has a closed form;
α is found by a grid over [0.01, 4] refined by a finer grid around the best point, for all
bootstrap replicates at once (numpy). Three parameters need at least four distinct batch sizes
(one degree of freedom left to judge the fit). The fit is refused, with the reason in words
(`FitFailure.reason`) instead of a curve that means nothing, when there are fewer, when the fitted
curve explains little of the variation between batch-size means, when the best exponent lies at
an edge of the grid (the data do not determine α: a power law with α → 0 or α → ∞ is not a
saturating curve the data show, so nothing about the curve's shape is claimed), and when α is so
small that the saturation point is an extrapolation far beyond the tested batch sizes.

Bands: the trials are resampled with replacement within each batch size (seeds are the
replicates), refitted, and the percentile band of the curve and of y_inf and B_sat are reported.
With 2–5 seeds per batch size these bootstrap bands are narrower than the truth (see `stats`):
read them as a lower bound on the uncertainty.

    >>> b = np.array([8, 16, 32, 64, 128, 256, 512])
    >>> fit = fit_power_law(b, 0.6 - 0.9 * b ** -0.5)
    >>> round(fit.y_inf, 3), round(fit.alpha, 2)
    (0.6, 0.5)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from scalestudy.errors import NotFittable

MIN_BATCH_SIZES = 4
ALPHA_MAX = 4.0
ALPHA_GRID = np.geomspace(0.01, ALPHA_MAX, 200)
# A fit whose curve explains less than this share of the variance between batch-size means is
# not a saturating power law worth drawing (e.g. a curve that rises then falls).
MIN_R2 = 0.5
# Below this exponent the curve closes under 3.5 % of its gap per doubling of B, so its asymptote
# and saturation point are extrapolations by many orders of magnitude (a 6-doubling sweep at a small
# budget gave B_sat ≈ 10^300): no asymptote is reported.
MIN_ALPHA = 0.05


@dataclass(frozen=True)
class PowerLaw:
    y_inf: float
    c: float
    alpha: float
    r2: float

    def __call__(self, batch: np.ndarray | float) -> np.ndarray:
        return self.y_inf - self.c * np.asarray(batch, dtype=float) ** -self.alpha

    @property
    def at_grid_edge(self) -> bool:
        """The best exponent is an end of the fit grid: the data pull α beyond what the grid
        allows, so they do not determine it (the least squares would go on improving past it)."""
        # The refined grid's end points are computed as lo + (hi − lo)·s: allow for rounding.
        return self.alpha <= ALPHA_GRID[0] * (1 + 1e-9) or self.alpha >= ALPHA_GRID[-1] * (1 - 1e-9)

    def saturation_batch(self, tol: float) -> float:
        """The batch size past which the curve is within `tol` of its asymptote."""
        if self.c == 0:
            return 1.0
        return max(1.0, (abs(self.c) / tol) ** (1 / self.alpha))


def _fit_means(sizes: np.ndarray, means: np.ndarray, weights: np.ndarray,
               alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares of batch-size means, for many replicates and α at once.

    sizes (S,), means (R, S), weights (S,) = trials per size, alphas (R, A) → y_inf, c and the
    weighted residual sum of squares, each (R, A). Fitting the means weighted by their counts
    gives the same (y_inf, c) as fitting every trial: the within-size scatter does not depend on
    the curve. For a fixed α the model is linear in (y_inf, c), so each is a closed form.
    """
    w = weights / weights.sum()
    z = -(sizes ** -alphas[..., None])  # (R, A, S)
    z_bar = (z * w).sum(-1)
    y_bar = (means * w).sum(-1)[:, None]
    dz = z - z_bar[..., None]
    dy = means[:, None, :] - y_bar[..., None]
    var = (w * dz * dz).sum(-1)
    safe = np.where(var > 0, var, 1.0)
    slope = np.where(var > 0, (w * dz * dy).sum(-1) / safe, 0.0)
    intercept = y_bar - slope * z_bar
    sse = (w * (dy - slope[..., None] * dz) ** 2).sum(-1)
    return intercept, slope, sse


def _fit_replicates(sizes: np.ndarray, means: np.ndarray, weights: np.ndarray) -> list[PowerLaw]:
    """Best (y_inf, c, α) per row of `means`: a grid over α, then a finer grid around its best."""
    rows = np.arange(means.shape[0])
    _, _, sse = _fit_means(sizes, means, weights, np.broadcast_to(ALPHA_GRID, (len(rows), len(ALPHA_GRID))))
    best = np.argmin(sse, axis=1)
    lo = ALPHA_GRID[np.maximum(best - 1, 0)]
    hi = ALPHA_GRID[np.minimum(best + 1, len(ALPHA_GRID) - 1)]
    fine = lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, 64)[None, :]  # 0.1 % steps in α
    intercept, slope, sse = _fit_means(sizes, means, weights, fine)
    j = np.argmin(sse, axis=1)
    fits = []
    for r in rows:
        curve = PowerLaw(float(intercept[r, j[r]]), float(slope[r, j[r]]), float(fine[r, j[r]]), 0.0)
        predicted = curve(sizes)
        total = ((means[r] - means[r].mean()) ** 2).sum()
        r2 = 1.0 if total == 0 else float(1 - ((means[r] - predicted) ** 2).sum() / total)
        fits.append(PowerLaw(curve.y_inf, curve.c, curve.alpha, r2))
    return fits


def _by_size(batch: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The distinct batch sizes and each one's finite values (its trials)."""
    x, y = np.asarray(batch, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    sizes = np.unique(x[keep])
    return sizes, [y[keep][x[keep] == b] for b in sizes]


def fit_power_law(batch: np.ndarray, y: np.ndarray) -> PowerLaw:
    """Least-squares fit of y = y_inf − c·B^(−α) to points (one per trial; repeats allowed).

    Its r2 is that of the batch-size means (the curve, not the seed scatter around it).
    """
    sizes, values = _by_size(batch, y)
    if len(sizes) < MIN_BATCH_SIZES:
        shown = ", ".join(f"{b:g}" for b in sizes) or "none"
        raise NotFittable(
            f"{len(sizes)} distinct batch sizes ({shown}); a saturating power law has 3 parameters "
            f"and needs at least {MIN_BATCH_SIZES} — add batch sizes to sweep.grid.train.batch_size"
        )
    means = np.array([[v.mean() for v in values]])
    return _fit_replicates(sizes, means, np.array([len(v) for v in values], dtype=float))[0]


@dataclass(frozen=True)
class FitSummary:
    """A fit with its bootstrap bands, for one line of a figure."""

    label: str
    fit: PowerLaw
    tol: float
    level: float
    batch_range: tuple[float, float]
    grid: np.ndarray = field(repr=False)
    band_low: np.ndarray = field(repr=False)
    band_high: np.ndarray = field(repr=False)
    y_inf_ci: tuple[float, float]
    saturation: float
    saturation_ci: tuple[float, float]

    @property
    def saturates_in_range(self) -> bool:
        return self.saturation <= self.batch_range[1]

    def describe(self, unit_scale: float = 100.0, unit: str = " pp") -> str:
        """One sentence: asymptote with CI, exponent, and where the curve saturates."""
        direction = "rises" if self.fit.c > 0 else "falls"
        lo, hi = self.saturation_ci
        # Past 100× the largest batch tested the upper bound is extrapolation, not information.
        limit = 100 * self.batch_range[1]
        upper = f"{hi:,.0f}" if hi <= limit else f"beyond {limit:,.0f}"
        point = f"{self.saturation:,.0f}" if self.saturation <= limit else f"> {limit:,.0f}"
        where = (
            f"saturates (within {self.tol * unit_scale:g}{unit} of it) at B ≈ {point} "
            f"({self.level:.0%} bootstrap CI {lo:,.0f} to {upper})"
        )
        if not self.saturates_in_range:
            where += f", beyond the largest batch size tested ({self.batch_range[1]:,.0f})"
        return (
            f"{self.label}: {direction} towards {self.fit.y_inf * unit_scale:.1f}{unit} "
            f"({self.level:.0%} bootstrap CI {self.y_inf_ci[0] * unit_scale:.1f}–"
            f"{self.y_inf_ci[1] * unit_scale:.1f}) with exponent α = {self.fit.alpha:.2f}; "
            f"{where}; R² of the batch-size means {self.fit.r2:.2f}"
        )


@dataclass(frozen=True)
class FitFailure:
    label: str
    reason: str

    def describe(self, unit_scale: float = 100.0, unit: str = " pp") -> str:
        return f"{self.label}: no fit — {self.reason}"


def fit_with_bands(label: str, batch: np.ndarray, y: np.ndarray, tol: float = 0.01,
                   n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> FitSummary | FitFailure:
    """Fit one curve and bootstrap its band; a FitFailure with the reason when it cannot be fit."""
    try:
        fit = fit_power_law(batch, y)
    except NotFittable as err:
        return FitFailure(label, str(err))
    if fit.r2 < MIN_R2:
        return FitFailure(
            label,
            f"the best saturating power law explains only R² = {fit.r2:.2f} of the variation "
            f"between batch-size means (below {MIN_R2}), so it does not describe these points — "
            "look at the points, not a fit",
        )
    if fit.at_grid_edge:
        return FitFailure(
            label,
            f"the best exponent is at the edge of the fit grid (α = {fit.alpha:.2g}, grid "
            f"{ALPHA_GRID[0]:g}–{ALPHA_GRID[-1]:g}), so the data do not determine one: no "
            "saturating power law describes these points — look at the points, not a fit",
        )
    largest = float(np.max(_by_size(batch, y)[0]))
    if fit.alpha < MIN_ALPHA and fit.saturation_batch(tol) > 100 * largest:
        return FitFailure(
            label,
            f"the fitted exponent α = {fit.alpha:.2f} (below {MIN_ALPHA}) puts the curve within "
            f"{tol * 100:g} pp of its asymptote only beyond B = {100 * largest:,.0f} (100× the "
            "largest batch size tested), so any asymptote would be extrapolation and none is "
            "reported — widen the batch range or raise train.examples_seen",
        )
    # Resample each batch size's trials (its seeds) with replacement: one row of means per replicate.
    rng = np.random.default_rng(seed)
    sizes, values = _by_size(batch, y)
    means = np.stack([v[rng.integers(0, len(v), (n_boot, len(v)))].mean(axis=1) for v in values], 1)
    boots = _fit_replicates(sizes, means, np.array([len(v) for v in values], dtype=float))
    grid = np.geomspace(sizes[0], sizes[-1], 64)
    curves = np.array([boot(grid) for boot in boots])
    asymptotes = [boot.y_inf for boot in boots]
    saturations = [boot.saturation_batch(tol) for boot in boots]
    tail = 100 * (1 - level) / 2
    band = np.percentile(np.array(curves), [tail, 100 - tail], axis=0)
    return FitSummary(
        label=label,
        fit=fit,
        tol=tol,
        level=level,
        batch_range=(float(sizes[0]), float(sizes[-1])),
        grid=grid,
        band_low=band[0],
        band_high=band[1],
        y_inf_ci=tuple(np.percentile(asymptotes, [tail, 100 - tail])),  # type: ignore[arg-type]
        saturation=fit.saturation_batch(tol),
        saturation_ci=tuple(np.percentile(saturations, [tail, 100 - tail])),  # type: ignore[arg-type]
    )


def fit_groups(trials: pl.DataFrame, x: str, y: str, hue: list[str], labels: dict[tuple, str],
               tol: float = 0.01, n_boot: int = 1000) -> list[FitSummary | FitFailure]:
    """One fit per line (group of `hue` axes) of `y` against batch size `x`, over its trials."""
    out: list[FitSummary | FitFailure] = []
    for key, group in trials.filter(pl.col(y).is_not_null()).group_by(hue, maintain_order=True):
        out.append(fit_with_bands(labels.get(tuple(key), str(key)), group[x].to_numpy(),
                                  group[y].to_numpy(), tol=tol, n_boot=n_boot))
    return out

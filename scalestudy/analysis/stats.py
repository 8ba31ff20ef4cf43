"""The statistics behind every interval and test of the report, as small pure functions.

Why Student t and not the percentile bootstrap: with 2–5 seeds the bootstrap's distribution of the
mean is built from the seeds' own spread, with no allowance for that spread being itself a guess,
so its intervals are too narrow (with 3 seeds a nominal 95 % bootstrap interval covers the true
mean about 80 % of the time; with 2 seeds it has only 3 distinct means). The t-interval
mean ± t_{(1+level)/2, n−1}·s/√n is exact for normal seed scatter and widens as it should as n
falls (t = 12.7 for 2 seeds, 2.78 for 5). One seed has no interval at all (None), not a
zero-width one.

Trials of two settings that share a seed (and every other axis) see the same data order and init,
so they are compared in pairs (`paired_test`): the seed-to-seed scatter common to both cancels.
Several comparisons at once (one per batch size) are corrected with Holm–Bonferroni (`holm`),
which controls the chance of any false claim among them at 1 − level without assuming independence.

Binary outcomes (diverged or not) get a Wilson score interval for a fraction and exact tests
(McNemar for pairs, Fisher for two groups): a t-interval over 0/1 values is degenerate when every
seed agrees.

No scipy: the t distribution comes from the regularised incomplete beta function
(continued fraction, Numerical Recipes §6.4), checked in the tests against closed forms and tables.

    >>> round(t_quantile(0.975, 4), 4)
    2.7764
    >>> [round(p, 3) for p in holm([0.01, 0.04, 0.03])]
    [0.03, 0.06, 0.06]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np
import polars as pl

# Continued-fraction convergence: relative change per term below EPS (double precision), at most
# MAX_TERMS terms (a few dozen suffice for the degrees of freedom a study has).
EPS = 1e-15
MAX_TERMS = 500
TINY = 1e-300
# Confidence level of every interval in the report, and the test level of its findings.
LEVEL = 0.95


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) by the modified Lentz method (Numerical Recipes §6.4)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > TINY else TINY)
    h = d
    for m in range(1, MAX_TERMS + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > TINY else TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > TINY else TINY
            h *= d * c
        if abs(d * c - 1.0) < EPS:
            return h
    raise ArithmeticError(f"incomplete beta I_{x}({a}, {b}) did not converge in {MAX_TERMS} terms")


def betainc(a: float, b: float, x: float, complement: float | None = None) -> float:
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 ≤ x ≤ 1.

    `complement` is 1 − x when the caller can compute it without cancellation (the t tail near
    t = 0 has x within 1e-11 of 1, where 1 − x in floating point keeps only five digits).
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc: a={a} and b={b} must be positive")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x={x} must lie in [0, 1]")
    y = 1.0 - x if complement is None else complement
    if x == 0.0 or y == 0.0:
        return 0.0 if x == 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log(y))
    # The fraction converges fast below the mode; above it, use I_x(a, b) = 1 − I_{1−x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, y) / b


def t_sf2(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's T with `df` degrees of freedom: the two-sided p-value of t."""
    if df <= 0:
        raise ValueError(f"t distribution: df={df} must be positive")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t), complement=t * t / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's T with `df` degrees of freedom."""
    tail = t_sf2(t, df) / 2.0
    return 1.0 - tail if t > 0 else tail


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's T with `df` degrees of freedom (bisection on t_cdf, to 1e-12).

    Cached: a report asks for the same few (level, n − 1) pairs for every group.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p={p} must lie strictly between 0 and 1")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def t_halfwidth(std: float | None, n: int, level: float) -> float | None:
    """Half the width of the t-interval of a mean of `n` values with sample std `std` (None for n < 2)."""
    if n < 2 or std is None or not math.isfinite(std):
        return None
    return t_quantile((1.0 + level) / 2.0, n - 1) * std / math.sqrt(n)


def t_interval(values: Sequence[float] | np.ndarray, level: float) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of `values` with the Student-t interval of the mean; no interval below 2."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, None, None
    mean = float(x.mean())
    half = t_halfwidth(float(x.std(ddof=1)) if x.size > 1 else None, int(x.size), level)
    return (mean, None, None) if half is None else (mean, mean - half, mean + half)


@dataclass(frozen=True)
class Test:
    """A mean (or mean difference) with its interval and two-sided p-value against zero.

    `low`/`high`/`p` are None when the test has too little data (fewer than two values);
    `method` names the interval and test, for captions and findings.
    """

    n: int
    mean: float
    low: float | None
    high: float | None
    p: float | None
    method: str

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def one_sample_t(values: Sequence[float] | np.ndarray, level: float, method: str = "t") -> Test:
    """Student's one-sample t-test of mean = 0 with the t-interval of the mean.

    Values that are all equal have no scatter: the p-value is 1 when they are all 0 and 0
    otherwise (every value says the same), and the interval is that one value.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return Test(0, math.nan, None, None, None, method)
    mean = float(x.mean())
    if n < 2:
        return Test(1, mean, None, None, None, method)
    std = float(x.std(ddof=1))
    if std == 0.0:
        return Test(n, mean, mean, mean, 1.0 if mean == 0.0 else 0.0, method)
    half = t_halfwidth(std, n, level)
    assert half is not None
    return Test(n, mean, mean - half, mean + half, t_sf2(mean / (std / math.sqrt(n)), n - 1), method)


def paired_test(first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray,
                level: float) -> Test:
    """Paired t-test of first − second (element i of each is one pair): mean difference, its
    t-interval (n − 1 degrees of freedom) and the two-sided p-value."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_test: {a.size} and {b.size} values do not pair up")
    keep = np.isfinite(a) & np.isfinite(b)
    return one_sample_t(a[keep] - b[keep], level, "paired t")


def welch_test(first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray,
               level: float) -> Test:
    """Welch's t-test of mean(first) − mean(second) for unpaired groups (unequal variances,
    Welch–Satterthwaite degrees of freedom); None interval and p with fewer than 2 per side."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    n = int(min(a.size, b.size))
    if n == 0:
        return Test(n, math.nan, None, None, None, "Welch t")
    diff = float(a.mean() - b.mean())
    if n < 2:
        return Test(n, diff, None, None, None, "Welch t")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se2 = va + vb
    if se2 == 0.0:
        return Test(n, diff, diff, diff, 1.0 if diff == 0.0 else 0.0, "Welch t")
    df = se2 ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = t_quantile((1.0 + level) / 2.0, df) * math.sqrt(se2)
    return Test(n, diff, diff - half, diff + half, t_sf2(diff / math.sqrt(se2), df), "Welch t")


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values, in the input order (None stays None and is not counted).

    Sorted ascending, the i-th smallest (1-based) of m is multiplied by m − i + 1, then made
    non-decreasing and capped at 1: rejecting where the adjusted p < α controls the
    family-wise error rate at α (Holm 1979).
    """
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None and not math.isnan(p))
    m = len(tested)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def wilson(successes: int, n: int, level: float) -> tuple[float | None, float | None]:
    """Wilson score interval of a fraction successes / n (None for n = 0): unlike the normal
    interval it stays inside [0, 1] and is not zero-width at 0/n or n/n."""
    if n == 0:
        return None, None
    z = NormalDist().inv_cdf((1.0 + level) / 2.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0/n and n/n the bound is exactly 0 (1); the formula leaves a rounding residue there.
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Exact McNemar test (two-sided binomial test on the discordant pairs): p-value that pairs
    where only the first member had the outcome and pairs where only the second had it are
    equally likely. 1 when no pair is discordant."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    k = min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def fisher_exact(a: int, n_a: int, b: int, n_b: int) -> float:
    """Two-sided Fisher exact test of a/n_a against b/n_b (unpaired binary outcomes): the
    probability, under equal rates and fixed margins, of a table at most as likely as the one seen."""
    total, hits = n_a + n_b, a + b
    if n_a == 0 or n_b == 0:
        return 1.0

    def prob(x: int) -> float:
        return math.comb(hits, x) * math.comb(total - hits, n_a - x) / math.comb(total, n_a)

    seen = prob(a)
    lo, hi = max(0, hits - n_b), min(hits, n_a)
    return min(1.0, sum(p for x in range(lo, hi + 1) if (p := prob(x)) <= seen * (1 + 1e-9)))


def t_columns(stats: pl.DataFrame, level: float = LEVEL, mean: str = "mean", std: str = "std",
              n: str = "n", prefix: str = "") -> pl.DataFrame:
    """Add `{prefix}ci_low`/`{prefix}ci_high`: the Student-t interval mean ± t·std/√n, per row.

    The t multiplier depends only on n, so it is computed once per distinct n (a study has a few)
    and mapped onto the rows: thousands of groups cost no Python loop. Rows with n < 2 get null
    (one seed has no interval).
    """
    sizes = [int(k) for k in stats[n].drop_nulls().unique().to_list() if k is not None and k >= 2]
    factor = {k: t_quantile((1 + level) / 2, k - 1) / math.sqrt(k) for k in sizes}
    half = (pl.col(n).replace_strict(factor, default=None, return_dtype=pl.Float64)
            * pl.col(std))
    return stats.with_columns((pl.col(mean) - half).alias(f"{prefix}ci_low"),
                              (pl.col(mean) + half).alias(f"{prefix}ci_high"))


def group_t_stats(frame: pl.LazyFrame | pl.DataFrame, by: list[str], values: list[str],
                  level: float = LEVEL, extra: list[pl.Expr] | None = None) -> pl.DataFrame:
    """Per group of `by`, for each column v of `values`: v_n, v (the mean), v_ci_low, v_ci_high
    (Student-t over the group's rows, e.g. the seeds of a setting at one step), plus `extra`
    aggregations."""
    aggs: list[pl.Expr] = list(extra or [])
    for v in values:
        ok = pl.col(v).is_not_null() & pl.col(v).is_finite()
        aggs += [ok.sum().alias(f"{v}_n"), pl.col(v).filter(ok).mean().alias(v),
                 pl.col(v).filter(ok).std().alias(f"{v}_std")]
    stats = frame.lazy().group_by(by).agg(aggs).collect()
    for v in values:
        stats = t_columns(stats, level, mean=v, std=f"{v}_std", n=f"{v}_n", prefix=f"{v}_")
    return stats.drop([f"{v}_std" for v in values]).sort(by, nulls_last=True)

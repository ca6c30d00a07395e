"""Statistics behind every verdict: bootstrap intervals, Spearman correlation with an interval, log-log slopes.

All functions are pure, vectorised (no per-sample Python loops) and seeded, so a report is reproducible.
Every interval is a two-sided 95 % interval unless ``level`` says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats as _st

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)


@dataclass
class Verdict:
    """One claim tested on the logs: what was measured, how uncertain it is, on how much data, and the answer."""

    claim: str
    verdict: str
    statistic: float | None
    interval: tuple[float, float] | None
    n: int
    runs: list[str] = field(default_factory=list)
    statistic_name: str = ""
    method: str = ""
    reason: str = ""
    section: str = ""
    id: str = ""  # stable identifier of the claim (e.g. "inertia.magnitude_reset"); a contract of verdicts.json

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["statistic"] = _finite_or_none(self.statistic)
        d["interval"] = None if self.interval is None else [_finite_or_none(v) for v in self.interval]
        d["n"] = int(self.n)
        return d


def _finite_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def bootstrap_ci(values, stat=np.mean, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over the 1-D sample ``values`` (resampled with replacement).

    ``stat`` must accept an array and ``axis=1``. Returns (nan, nan) for fewer than two values.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    # resample in chunks to bound memory at n_boot * chunk floats
    chunk = max(1, min(n_boot, 2_000_000 // v.size))
    out = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, v.size, size=(min(chunk, n_boot - start), v.size))
        out.append(stat(v[idx], axis=1))
    boots = np.concatenate(out)
    a = (1 - level) / 2
    return (float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a)))


def bootstrap_proportion_ci(k, n, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """Bootstrap interval of proportions k/n (arrays allowed).

    Resampling n Bernoulli outcomes with replacement and counting the ones is exactly a Binomial(n, k/n) draw, so the
    nonparametric bootstrap of a proportion is computed without materialising the resamples.
    Returns (lo, hi) arrays; nan where n == 0.
    """
    k = np.atleast_1d(np.asarray(k, dtype=float))
    n = np.atleast_1d(np.asarray(n, dtype=float))
    lo = np.full(k.shape, math.nan)
    hi = np.full(k.shape, math.nan)
    ok = n > 0
    if ok.any():
        rng = np.random.default_rng(seed)
        p = k[ok] / n[ok]
        draws = rng.binomial(n[ok].astype(np.int64)[:, None], p[:, None], size=(int(ok.sum()), n_boot)) / n[ok][:, None]
        a = (1 - level) / 2
        lo[ok] = np.quantile(draws, a, axis=1)
        hi[ok] = np.quantile(draws, 1 - a, axis=1)
    return lo, hi


def cluster_bootstrap_ratio_ci(k, n, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the pooled proportion Σk/Σn, resampling whole clusters with replacement.

    ``k[j]``, ``n[j]``: successes and trials of cluster j (e.g. one tracked weight's flips and rows in an inertia
    bin). Rows of one cluster are correlated, so clusters, not rows, are the independent units: each resample
    draws m = len(k) clusters with replacement (multinomial counts c) and computes Σ c_j k_j / Σ c_j n_j.
    Returns (nan, nan) without data; a single cluster gives a zero-width interval at its proportion.

    >>> cluster_bootstrap_ratio_ci([1, 1], [2, 2])
    (0.5, 0.5)
    """
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    m = k.size
    if m == 0 or n.sum() <= 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot).astype(float)
    den = counts @ n
    ratio = np.divide(counts @ k, den, out=np.full(n_boot, math.nan), where=den > 0)
    a = (1 - level) / 2
    lo, hi = np.nanquantile(ratio, [a, 1 - a])
    return (float(lo), float(hi))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for a proportion k/n."""
    if n <= 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(_st.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(_st.beta.ppf(1 - a, k + 1, n - k))
    return (lo, hi)


@dataclass
class Correlation:
    rho: float
    interval: tuple[float, float]
    n: int
    method: str


def spearman_ci(x, y, n_eff: int | None = None, level: float = 0.95) -> Correlation:
    """Spearman rank correlation of x and y with a Fisher-z interval.

    SE of atanh(rho) is 1.03 / sqrt(n_eff - 3) (Fieller, Hartley & Pearson 1957). ``n_eff`` defaults to the number of
    pairs; pass a smaller number (e.g. independent units such as tracked weights) when rows are correlated.
    Returns nan values when fewer than 4 units or when either variable is constant.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size) if n_eff is None else int(min(n_eff, x.size))
    method = f"Spearman rho, Fisher-z interval with n_eff={n}"
    if x.size < 4 or n < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(math.nan, (math.nan, math.nan), n, method)
    rx = _st.rankdata(x)
    ry = _st.rankdata(y)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    lo, hi = fisher_interval(rho, n, level)
    return Correlation(rho, (lo, hi), n, method)


def fisher_interval(rho: float, n: int, level: float = 0.95, se_factor: float = 1.03) -> tuple[float, float]:
    if not math.isfinite(rho) or n < 4:
        return (math.nan, math.nan)
    z = math.atanh(max(min(rho, 0.999999), -0.999999))
    se = se_factor / math.sqrt(n - 3)
    q = _st.norm.ppf(1 - (1 - level) / 2)
    return (math.tanh(z - q * se), math.tanh(z + q * se))


def pooled_fisher(rhos, ns, level: float = 0.95) -> Correlation:
    """Combine correlations of independent units: inverse-variance weighted mean of atanh(rho), weights n - 3."""
    rhos = np.asarray(rhos, dtype=float)
    ns = np.asarray(ns, dtype=float)
    ok = np.isfinite(rhos) & (ns >= 4)
    if not ok.any():
        return Correlation(math.nan, (math.nan, math.nan), int(ns[np.isfinite(ns)].sum()), "pooled Fisher z")
    z = np.arctanh(np.clip(rhos[ok], -0.999999, 0.999999))
    w = ns[ok] - 3
    zbar = float((w * z).sum() / w.sum())
    se = 1.03 / math.sqrt(w.sum())
    q = _st.norm.ppf(1 - (1 - level) / 2)
    n = int(ns[ok].sum())
    return Correlation(math.tanh(zbar), (math.tanh(zbar - q * se), math.tanh(zbar + q * se)), n,
                       f"pooled Fisher z over {int(ok.sum())} units (weights n_eff-3)")


@dataclass
class Slope:
    slope: float
    interval: tuple[float, float]
    n: int
    df: int
    method: str
    intercepts: dict = field(default_factory=dict)


def loglog_slope(x, y, groups=None, level: float = 0.95) -> Slope:
    """OLS slope of log(y) on log(x), with a separate intercept per group (e.g. per run), and a t-interval.

    The interval uses the regression standard error (residual df = n - n_groups - 1). Non-positive or
    non-finite values are dropped. Returns nan when fewer than 3 points or fewer than 2 distinct x values.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    g = np.zeros(x.shape, dtype=object) if groups is None else np.asarray(groups, dtype=object)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly, g = np.log(x[ok]), np.log(y[ok]), g[ok]
    return linear_slope(lx, ly, g, level, method="OLS of log y on log x, intercept per run, t-interval (regression SE)")


def linear_slope(x, y, groups=None, level: float = 0.95, method: str = "OLS, t-interval") -> Slope:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    g = np.zeros(x.shape, dtype=object) if groups is None else np.asarray(groups, dtype=object)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, g = x[ok], y[ok], g[ok]
    n = int(x.size)
    levels = list(dict.fromkeys(g.tolist()))
    df = n - len(levels) - 1
    if n < 3 or np.unique(x).size < 2 or df < 1:
        return Slope(math.nan, (math.nan, math.nan), n, max(df, 0), method)
    # within-group centring == fixed effects per group
    xc = x.copy()
    yc = y.copy()
    means = {}
    for lev in levels:
        m = g == lev
        means[lev] = (x[m].mean(), y[m].mean())
        xc[m] -= means[lev][0]
        yc[m] -= means[lev][1]
    sxx = float((xc**2).sum())
    if sxx <= 0:
        return Slope(math.nan, (math.nan, math.nan), n, df, method)
    b = float((xc * yc).sum() / sxx)
    resid = yc - b * xc
    s2 = float((resid**2).sum() / df)
    se = math.sqrt(s2 / sxx)
    q = float(_st.t.ppf(1 - (1 - level) / 2, df))
    intercepts = {str(k): float(my - b * mx) for k, (mx, my) in means.items()}
    return Slope(b, (b - q * se, b + q * se), n, df, method, intercepts)


def verdict_negative(stat: float, interval, n: int, min_n: int, negligible: float) -> tuple[str, str]:
    """Verdict for a claim "the quantity is negative" (e.g. a correlation or a slope).

    supported: the whole interval is below 0; not supported: the interval excludes every value below -negligible
    (no meaningful negative effect); inconclusive: too little data (n < min_n), no estimate, or an interval that
    straddles both.
    """
    lo, hi = (math.nan, math.nan) if interval is None else interval
    if n < min_n:
        return INCONCLUSIVE, f"too little data (n={n} < {min_n})"
    if not (math.isfinite(stat) and math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE, "no estimate (constant data or too few distinct values)"
    if hi < 0:
        return SUPPORTED, "the whole interval is below 0"
    if lo > -negligible:
        return NOT_SUPPORTED, f"the interval excludes effects stronger than -{negligible:g}"
    return INCONCLUSIVE, "the interval includes both 0 and a meaningful negative effect"


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): mean ± t_{n−1, (1+level)/2} · s / √n over the finite values of independent units (one value
    per run/seed); nan interval for n < 2, a zero-width one at the mean when every value is equal.

    >>> [round(x, 4) for x in t_interval([1.0, 2.0, 3.0])]   # s = 1, t_{2,0.975} = 4.3027
    [2.0, -0.4841, 4.4841]
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if v.size < 2:
        return m, math.nan, math.nan
    h = float(_st.t.ppf(1 - (1 - level) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return m, m - h, m + h


def mean_t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """(lo, hi) of :func:`t_interval`.

    >>> mean_t_interval([1.0, 1.0, 1.0])
    (1.0, 1.0)
    """
    return t_interval(values, level)[1:]


def run_bootstrap_ci(per_run, stat, n_boot: int = 1000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float]:
    """Cluster bootstrap over runs: resample whole runs with replacement and recompute ``stat`` on the union.

    ``per_run``: a list with one item per run (e.g. that run's table); ``stat(list_of_items) -> float``. Runs are the
    independent units, so rows inside one run are never resampled on their own. Percentile interval; (nan, nan)
    with fewer than two runs.
    """
    m = len(per_run)
    if m < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    vals = np.array([stat([per_run[i] for i in rng.integers(0, m, m)]) for _ in range(n_boot)], dtype=float)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    return (float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a)))


def verdict_mean_positive(values, negligible: float) -> tuple[str, str, tuple[float, float]]:
    """Verdict for "the mean over runs is positive", from one value per run: 95 % t-interval over runs; supported
    when it lies above 0, not supported when it lies below ``negligible`` (no meaningful positive effect), else
    inconclusive. Returns (verdict, reason, interval); the caller checks the number of seeds first."""
    lo, hi = mean_t_interval(values)
    if lo > 0:
        return SUPPORTED, "the whole interval lies above 0", (lo, hi)
    if hi < negligible:
        return NOT_SUPPORTED, f"the interval lies below {negligible:g}", (lo, hi)
    return INCONCLUSIVE, f"the interval contains 0 and values above {negligible:g}", (lo, hi)

"""Statistics behind the verdicts, checked against known answers."""

import math

import numpy as np
import pytest

from bnn_probe.reports import stats


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = stats.bootstrap_ci(rng.normal(1.0, 1.0, 50), n_boot=500)
    large = stats.bootstrap_ci(rng.normal(1.0, 1.0, 5000), n_boot=500)
    assert small[0] < 1.0 < small[1]
    assert large[0] < 1.0 < large[1]
    assert (large[1] - large[0]) < (small[1] - small[0]) / 5
    assert all(math.isnan(x) for x in stats.bootstrap_ci([1.0]))


def test_bootstrap_proportion_matches_binomial_spread():
    lo, hi = stats.bootstrap_proportion_ci([50, 0], [100, 0], n_boot=4000)
    # normal approximation: 0.5 ± 1.96 * 0.05
    assert lo[0] == pytest.approx(0.402, abs=0.02) and hi[0] == pytest.approx(0.598, abs=0.02)
    assert math.isnan(lo[1]) and math.isnan(hi[1])


def test_clopper_pearson_edges():
    assert stats.clopper_pearson(10, 10)[1] == 1.0
    lo, hi = stats.clopper_pearson(0, 100)
    assert lo == 0.0 and hi == pytest.approx(0.0362, abs=1e-3)  # the "rule of three" region


def test_spearman_monotone_and_flat():
    x = np.arange(100.0)
    c = stats.spearman_ci(x, np.exp(-x / 10))
    assert c.rho == pytest.approx(-1.0)
    assert c.interval[1] < -0.9
    flat = stats.spearman_ci(x, np.ones(100))
    assert math.isnan(flat.rho)
    few = stats.spearman_ci([1, 2, 3], [3, 2, 1])
    assert math.isnan(few.rho)


def test_spearman_n_eff_widens_the_interval():
    rng = np.random.default_rng(1)
    x = rng.normal(size=2000)
    y = -x + rng.normal(size=2000) * 3
    wide = stats.spearman_ci(x, y, n_eff=50)
    narrow = stats.spearman_ci(x, y)
    assert wide.rho == narrow.rho
    assert (wide.interval[1] - wide.interval[0]) > 4 * (narrow.interval[1] - narrow.interval[0])


def test_loglog_slope_recovers_power_law_with_group_intercepts():
    fan = np.array([16, 64, 256, 1024, 4096] * 2, dtype=float)
    groups = ["a"] * 5 + ["b"] * 5
    rng = np.random.default_rng(2)
    y = np.where(np.array(groups) == "a", 1.0, 7.0) * fan**-0.5 * np.exp(rng.normal(0, 0.01, 10))
    s = stats.loglog_slope(fan, y, groups)
    assert s.slope == pytest.approx(-0.5, abs=0.02)
    assert s.interval[0] < -0.5 < s.interval[1]
    assert s.df == 10 - 2 - 1
    assert math.isnan(stats.loglog_slope([64, 64, 64], [1, 2, 3]).slope)  # one distinct x
    assert math.isnan(stats.loglog_slope([1, 2], [1, 2]).slope)  # too few points


def test_verdict_negative_three_ways():
    assert stats.verdict_negative(-0.5, (-0.6, -0.4), 100, 10, 0.1)[0] == stats.SUPPORTED
    assert stats.verdict_negative(0.01, (-0.05, 0.07), 100, 10, 0.1)[0] == stats.NOT_SUPPORTED
    assert stats.verdict_negative(-0.1, (-0.4, 0.2), 100, 10, 0.1)[0] == stats.INCONCLUSIVE
    assert stats.verdict_negative(-0.5, (-0.6, -0.4), 5, 10, 0.1)[0] == stats.INCONCLUSIVE
    assert stats.verdict_negative(math.nan, (math.nan, math.nan), 100, 10, 0.1)[0] == stats.INCONCLUSIVE


def test_verdict_json_has_the_contract_keys():
    v = stats.Verdict("c", stats.SUPPORTED, -0.5, (-0.6, math.nan), 12, ["a"])
    d = v.to_json()
    assert {"claim", "verdict", "statistic", "interval", "n", "runs"} <= set(d)
    assert d["interval"] == [-0.6, None]
    with pytest.raises(ValueError):
        stats.Verdict("c", "maybe", None, None, 0)


def test_cluster_bootstrap_resamples_weights_not_rows():
    """Two weights, one never flips and one always does (10 rows each): the pooled proportion is 0.5, but with two
    independent units a resample holds both (0.5), or one twice (0 or 1), each with probability 1/4 — the 95 %
    interval is [0, 1]. A row-level bootstrap (20 'independent' rows) would claim about [0.3, 0.7]."""
    from bnn_probe.reports.stats import bootstrap_proportion_ci, cluster_bootstrap_ratio_ci

    assert cluster_bootstrap_ratio_ci([0, 10], [10, 10], n_boot=2000) == (0.0, 1.0)
    lo, hi = bootstrap_proportion_ci([10], [20], n_boot=2000)
    assert 0.2 < lo[0] < 0.5 < hi[0] < 0.8 and hi[0] - lo[0] < 0.5
    # many independent weights with the same pooled proportion: a narrow interval around it
    k, n = [1] * 200 + [0] * 200, [2] * 400
    lo, hi = cluster_bootstrap_ratio_ci(k, n, n_boot=2000)
    assert 0.2 < lo < 0.25 < hi < 0.3
    assert all(math.isnan(v) for v in cluster_bootstrap_ratio_ci([], []))

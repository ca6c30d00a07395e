"""The flow recommendation (reports/thresholds.py: mean_overshoot, flow_threshold, method="flow") against hand
computations, a simulated drift process whose flip rate at any τ is known, and the report / CLI / from-report path."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bnn_probe.reports import thresholds
from bnn_probe.reports.synthetic import make_run
from bnn_probe.runlog.schema import MARGIN_LADDER

K = np.asarray(MARGIN_LADDER)


def _ladder(at_tau: float, slope: float) -> np.ndarray:
    """R(k·τ) = at_tau·k^−slope for k ≥ 1 (below τ: the stock, unused by the flow model, set to 1)."""
    return np.where(K >= 1, at_tau * K ** -slope, 1.0)


def test_mean_overshoot_hand_computed():
    # R(y) = 0.1·y^−2 (τ = 1): ∫_1^∞ R dy = 0.1 exactly (segments 0.05 + 0.025 + 0.0125, tail 0.0125), ō = 1
    o, flag = thresholds.mean_overshoot(_ladder(0.1, 2.0), 1.0)
    assert o == pytest.approx(1.0, rel=1e-12) and flag == ""
    # R(y) = 0.1/y: each segment ∫ = R_a·a·log 2 = 0.1·log 2; the tail past 8τ is not integrable → cut, flagged
    o, flag = thresholds.mean_overshoot(_ladder(0.1, 1.0), 1.0)
    assert o == pytest.approx(3 * math.log(2), rel=1e-12) and "cut at 8τ" in flag
    # no weight past 2τ: linear between R(τ) and R(2τ) = 0, ō = τ/2; units follow τ
    o, flag = thresholds.mean_overshoot([1, 1, 1, 0.2, 0, 0, 0], 1e-6)
    assert o == pytest.approx(0.5e-6) and flag == ""
    assert math.isnan(thresholds.mean_overshoot([1, 1, 1, 0, 0, 0, 0], 1.0)[0])


def test_flow_threshold_formula_and_floor():
    r = _ladder(0.1, 2.0)  # ō = τ = 2 (τ = 2: the ladder scales with τ)
    tau, bound, e_tau, e_rec, o = thresholds.flow_threshold(r, 2.0, 0.1, 0.05)
    assert o == pytest.approx(2.0)
    assert tau == pytest.approx((0.1 / 0.05) * (2.0 + 2.0) - 2.0) and bound == ""  # τ* = (r/t)(τ + ō) − ō = 6
    assert e_tau == pytest.approx(-0.5) and e_rec == pytest.approx(-6.0 / 8.0)
    assert thresholds.flow_threshold(r, 2.0, 0.1, 0.1)[0] == pytest.approx(2.0)  # at the target: τ kept
    # r(0) = r·(τ + ō)/ō = 0.2: a target of 0.3 is out of reach, τ/8 and flagged; so is a τ* below τ/8
    tau, bound, *_ = thresholds.flow_threshold(r, 2.0, 0.1, 0.3)
    assert tau == pytest.approx(0.25) and "floor τ/8" in bound and "τ → 0" in bound
    tau, bound, *_ = thresholds.flow_threshold(r, 2.0, 0.1, 0.19)
    assert tau == pytest.approx(0.25) and "below τ/8" in bound
    assert math.isnan(thresholds.flow_threshold(r, 2.0, 0.0, 0.1)[0])
    assert math.isnan(thresholds.flow_threshold(np.full(7, np.nan), 2.0, 0.1, 0.1)[0])


def _simulate(tau: float, pace: np.ndarray, n_steps: int = 3000) -> tuple[float, np.ndarray]:
    """Margins that drift towards τ at a constant pace per weight (each weight's m grows along w by ``pace`` per
    step); a weight flips when its margin exceeds τ, which turns the margin into −margin. Returns the flip ratio
    and the ladder R(k·τ) (mean over steps of the share of margins above k·τ before the decision)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-tau, tau, size=pace.shape)
    flips, exceed = 0, np.zeros(len(K))
    for _ in range(n_steps):
        x = x + pace
        exceed += (x[None, :] > (K * tau)[:, None]).mean(axis=1)
        flip = x > tau
        flips += int(flip.sum())
        x = np.where(flip, -x, x)
    return flips / (n_steps * x.size), exceed / n_steps


@pytest.mark.parametrize(("step_over_tau", "tol"), [(0.2, 0.15), (1.0, 0.03), (2.0, 0.03)])
def test_flow_recovers_the_rate_of_a_drift_process(step_over_tau, tol):
    """Known answer: in a pure drift process the time between flips is 2(τ + mean overshoot)/pace, which is what the
    flow model assumes; τ* recommended from a run at τ must give the target at τ* when simulated again. With steps
    comparable to τ the rate falls more slowly than 1/τ and a recommendation assuming rate ∝ 1/τ is off by 5–10×
    as much. With steps of 0.1–0.3τ no margin passes 2τ and the ladder only bounds the overshoot (ō = τ/2 is taken,
    true 0.1τ): the recommendation is then coarser (within 15 %)."""
    tau = 1.0
    pace = np.random.default_rng(1).uniform(0.5, 1.5, size=4000) * step_over_tau * tau
    r, ladder = _simulate(tau, pace)
    target = 0.6 * r
    rec, bound, *_ = thresholds.flow_threshold(ladder, tau, r, target)
    assert bound == "" and rec > tau
    r_rec, _ = _simulate(rec, pace)
    assert r_rec == pytest.approx(target, rel=tol)
    naive = tau * r / target  # rate ∝ 1/τ
    if step_over_tau >= 1:
        assert abs(math.log(_simulate(naive, pace)[0] / target)) > 4 * abs(math.log(r_rec / target))


def test_recommended_thresholds_flow_method_keeps_the_table_contract(tmp_path):
    from bnn_probe.optim.thresholds import read_thresholds_csv

    run = make_run("a", seed=1, noise=0.0, n_steps=40, n_tracked=2, threshold=1e-6, flip_base=0.05)
    lt = thresholds.layer_table([run])
    rec = thresholds.recommended_thresholds(lt, method="flow")
    t = rec.table
    assert set(t["method"]) == {"flow"} and rec.method.startswith("Flow model")
    assert (t["mean_overshoot"] > 0).all() and ((t["elasticity"] < 0) & (t["elasticity"] >= -1)).all()
    for row in t.itertuples():  # the formula, row by row, from the table's own columns
        tgt = rec.target["a"]
        want = (row.flip_ratio / tgt) * (row.threshold + row.mean_overshoot) - row.mean_overshoot
        assert row.recommended_threshold == pytest.approx(max(want, row.threshold / 8), rel=1e-9)
    path = tmp_path / "thresholds.csv"
    t[["layer", "fan_in", "n_weights", "flip_ratio", "recommended_threshold", "run", "method"]].to_csv(path,
                                                                                                         index=False)
    assert read_thresholds_csv(path) == pytest.approx(dict(zip(t["layer"], t["recommended_threshold"],
                                                               strict=True)))


def test_report_cli_threshold_method_flow(tmp_path):
    from click.testing import CliRunner

    from bnn_probe.cli import cli
    from bnn_probe.reports.synthetic import write_run

    write_run(make_run("c", seed=1, n_steps=20, n_tracked=2), tmp_path / "c")
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "c"), "--out", str(tmp_path / "rep"), "--format", "md",
                                    "--quiet", "--threshold-method", "flow"])
    assert res.exit_code == 0, res.output
    csv = pd.read_csv(tmp_path / "rep" / "tables" / "thresholds.csv")
    assert list(csv.columns[:5]) == ["layer", "fan_in", "n_weights", "flip_ratio", "recommended_threshold"]
    assert set(csv["method"]) == {"flow"} and "mean_overshoot" in csv


def _bop_ou(tau: float, gamma: float = 0.02, n: int = 1500, n_steps: int = 3000, seed: int = 0):
    """Bop on pure-noise gradients: m_t = (1 − γ)m_{t−1} + γ·g_t, g ~ N(0, 1) per weight and step, w flips when
    w_{t−1}·m_t > τ. Returns the flip ratio, the ladder R(k·τ), the RMS step of m and the stationary SD of m."""
    rng = np.random.default_rng(seed)
    sd = math.sqrt(gamma / (2 - gamma))
    m = rng.normal(0, sd, n)
    w = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    flips, exceed, sq = 0, np.zeros(len(K)), 0.0
    for _ in range(n_steps):
        new = (1 - gamma) * m + gamma * rng.normal(0, 1, n)
        sq += float(((new - m) ** 2).mean())
        m = new
        x = w * m
        exceed += (x[None, :] > (K * tau)[:, None]).mean(axis=1)
        flip = x > tau
        flips += int(flip.sum())
        w = np.where(flip, -w, w)
    return flips / (n * n_steps), exceed / n_steps, math.sqrt(sq / n_steps), sd


def test_margin_distance_limits():
    assert thresholds.margin_distance(2.0) == 2.0  # no σ: D(τ) = τ
    assert thresholds.margin_distance(1e-3, 1.0) == pytest.approx(1e-3, rel=1e-6)  # τ ≪ σ
    # F(1) = ∫_0^1 e^{u²/2} du = 1.19496…
    assert thresholds.margin_distance(2.0, 2.0) == pytest.approx(2 * 1.194957, rel=1e-5)
    assert math.isinf(thresholds.margin_distance(40.0, 1.0))


@pytest.mark.parametrize(("tau_over_sd", "factor"), [(1.5, 0.5), (0.3, 2.0)])
def test_flow_recovers_the_rate_of_bop_on_noise(tau_over_sd, factor):
    """Known answer: Bop on pure-noise gradients is the Ornstein–Uhlenbeck case the model is built for; τ* from a
    run at τ, simulated again, gives the target flip ratio. σ comes from the RMS step of m as in the report
    (σ = RMS(Δm)/√(2γ)). With τ at 1.5σ the rate falls much faster than 1/τ: the flow model without σ (D(τ) = τ)
    overshoots by an order of magnitude."""
    gamma = 0.02
    tau = tau_over_sd * math.sqrt(gamma / (2 - gamma))
    r, ladder, step, sd = _bop_ou(tau, gamma)
    sigma = step / math.sqrt(2 * gamma)
    assert sigma == pytest.approx(sd, rel=0.02)
    target = factor * r
    rec, bound, e_tau, _, _ = thresholds.flow_threshold(ladder, tau, r, target, sigma, step)
    assert bound == ""
    r_rec = _bop_ou(rec, gamma, seed=1)[0]
    assert r_rec == pytest.approx(target, rel=0.1)
    if tau_over_sd > 1:
        assert e_tau < -1.5
        plain = thresholds.flow_threshold(ladder, tau, r, target)[0]
        assert _bop_ou(plain, gamma, seed=1)[0] < 0.3 * target


def test_secant_threshold_hand_computed():
    tau, bound, e = thresholds.secant_threshold(1.0, 0.04, 2.0, 0.01, 0.02)  # e = log(1/4)/log 2 = −2
    assert e == pytest.approx(-2.0) and tau == pytest.approx(2.0 * 2 ** -0.5) and bound == ""
    tau, bound, e = thresholds.secant_threshold(1.0, 0.04, 2.0, 0.039, 0.001)  # e ≈ −0.04 → −0.1, move > 8
    assert e == -0.1 and tau == pytest.approx(16.0) and "clipped" in bound and "×8" in bound
    assert math.isnan(thresholds.secant_threshold(1.0, 0.04, 1.1, 0.01, 0.02)[0])  # τ moved < ×1.2
    assert math.isnan(thresholds.secant_threshold(1.0, 0.01, 2.0, 0.02, 0.02)[0])  # rate rose with τ
    assert math.isnan(thresholds.secant_threshold(1.0, 0.0, 2.0, 0.02, 0.02)[0])


def test_fed_run_gets_the_secant_through_its_source():
    """A fed run whose source run is in the table: layers whose τ moved get τ* from the two measured points."""
    rows = []
    for run, tau_a, fr_a in (("g", 1.0, 0.04), ("fed", 2.0, 0.01)):
        for layer, tau, fr in (("a", tau_a, fr_a), ("b", 1.0, 0.02), ("c", 1.0, 0.02)):
            rows.append({"run": run, "family": "bop", "layer": layer, "fan_in": 8, "n_weights": 100,
                         "flip_ratio": fr, "threshold": tau,
                         **dict(zip(thresholds.MARGIN_RATES, _ladder(fr, 2.0), strict=True))})
    lt = pd.DataFrame(rows)
    rec = thresholds.recommended_thresholds(lt, method="flow", sources={"fed": "g"})
    t = rec.table.set_index(["run", "layer"])
    assert rec.target["fed"] == pytest.approx(0.02)
    a = t.loc[("fed", "a")]
    assert a["method"] == "flow, secant through the source run" and a["elasticity"] == pytest.approx(-2.0)
    assert a["recommended_threshold"] == pytest.approx(2.0 * 2 ** -0.5)
    assert t.loc[("fed", "b"), "method"] == "flow"  # τ did not move: the flow model
    assert set(t.loc["g", "method"]) == {"flow"}
    assert "secant" in rec.method


def test_margin_quantiles_extend_the_overshoot_tail():
    """R(y) = 0.1/y on the ladder (not integrable past 8τ); the margin's q99 at 10τ (R = 0.01) and q99.9 at 40τ
    (R = 0.001) close the tail: ∫ = 3·0.1·log 2 + 0.0125·8·log(10/8) + 0.01·10·(1 − 4^{1−s})/(s − 1) + 0.001·40/(s − 1),
    s = log 10/log 4 on the last segment."""
    lad = _ladder(0.1, 1.0)
    s = math.log(10) / math.log(4)
    want = (3 * 0.1 * math.log(2) + 0.1 * math.log(10 / 8) + 0.1 * (1 - 4 ** (1 - s)) / (s - 1)
            + 0.04 / (s - 1)) / 0.1
    o, flag = thresholds.mean_overshoot(lad, 1.0, tail=[(10.0, 0.01), (40.0, 0.001)])
    assert o == pytest.approx(want, rel=1e-9) and flag == ""
    # quantiles inside the ladder or above R(8τ) add nothing
    assert thresholds.mean_overshoot(lad, 1.0, tail=[(4.0, 0.001), (20.0, 0.5)]) == thresholds.mean_overshoot(lad, 1.0)
    o, flag = thresholds.mean_overshoot(lad, 1.0, tail=[(10.0, 0.01), (100.0, 0.001)])  # s = 1 again: cut, flagged
    assert "100τ (margin quantile)" in flag

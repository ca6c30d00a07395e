"""Run checks (probe/checks.py): each warning kind fires when its condition holds and not otherwise; meta.json,
``summary`` and the report show them; blocking warnings keep a run out of the report's verdicts."""

from __future__ import annotations

import json

import pytest
import torch
from _probe_helpers import MiniBop, Multi
from conftest import run_cli
from torch import nn

import bnn_probe
from bnn_probe.nn import BinaryLinear
from bnn_probe.probe import checks, cpu_pass
from bnn_probe.probe.binarizers import Sign
from bnn_probe.reports import run_warnings


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = BinaryLinear(4, 3)  # binarizes its weight in the forward pass: no warning

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def _kinds(path) -> set[tuple[str, str]]:
    meta = json.loads((path / "meta.json").read_text())
    kinds = {(w["kind"], w["layer"]) for w in meta["warnings"]}
    assert {(w["kind"], w["layer"]) for w in bnn_probe.load_run(path).warnings} == kinds
    return kinds


def _steps(model, opt, n, grad=None, between=None):
    g = torch.Generator().manual_seed(0)
    for t in range(n):
        for p in model.parameters():
            p.grad = grad(p) if grad else torch.randn(p.shape, generator=g)
        opt.step()
        if between:
            between(t)


def test_too_broad_selection_warns_on_raw_use(tmp_path):
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False, binary=lambda n, p: n.endswith("weight"))
    loss = model(torch.randn(2, 2, 5, 5)).sum()
    loss.backward()
    opt.step()
    model(torch.randn(2, 2, 5, 5))  # the check runs once: no second warning, no error
    probe.close()
    assert _kinds(tmp_path / "r") == {("not_binarized", "conv.weight"), ("not_binarized", "bn.weight")}


def test_no_warnings_on_a_clean_run(tmp_path):
    model = Multi(0, latent=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    probe = bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False, check_every=1)
    _steps(model, opt, 5)
    probe.close()
    assert _kinds(tmp_path / "r") == set()


def _bop(path, dead: str | None = None, steps: int = 4, **opts):
    """Multi(0) under MiniBop, gradients 1 (or 0 for parameter ``dead``, "all" for every one), probe attached."""
    model = Multi(0)
    opt = MiniBop(model.parameters(), gamma=0.5, threshold=0.1)
    probe = bnn_probe.attach(model, opt, path, tensorboard=False, **{"check_every": 1, **opts})
    names = {id(p): n for n, p in model.named_parameters()}

    def grad(p):
        return torch.zeros_like(p) if dead in ("all", names[id(p)]) else torch.ones_like(p)

    _steps(model, opt, steps, grad=grad)
    return model, opt, probe


def test_dead_gradients(tmp_path):
    _, _, probe = _bop(tmp_path / "r", dead="w1")
    probe.close()
    assert _kinds(tmp_path / "r") == {("dead_gradients", "w1")}


def test_nonfinite_state_and_changed_outside_step(tmp_path):
    model = Multi(0, latent=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    probe = bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False, check_every=1)

    def clamp(t):
        with torch.no_grad():
            model.w0.clamp_(-0.1, 0.1)  # outside optimizer.step()

    _steps(model, opt, 3, between=clamp)
    model.w2.grad = torch.full_like(model.w2, float("nan"))
    opt.step()
    probe.close()
    kinds = _kinds(tmp_path / "r")
    assert kinds == {("changed_outside_step", "w0"), ("nonfinite_state", "w2")}


def test_non_binary_weights_under_bop_and_binarizer_zeros(tmp_path):
    model = Multi(0)
    with torch.no_grad():
        model.w0.mul_(0.5)
        model.w3[0] = 0.0
    opt = MiniBop(model.parameters(), gamma=0.5, threshold=0.1)
    probe = bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False, check_every=1,
                             binarizer={"w3": Sign(zero=0)})
    _steps(model, opt, 2, grad=lambda p: torch.ones_like(p) * 1e-3)
    probe.close()
    assert _kinds(tmp_path / "r") == {("non_binary_weights", "w0"), ("non_binary_weights", "w3"),
                                      ("binarizer_zeros", "w3")}


def _run(path, dead: bool) -> None:
    _, _, probe = _bop(path, dead="all" if dead else None)
    probe.log(loss=1.0)
    probe.close()


def test_summary_and_report_show_and_exclude(tmp_path, capsys):
    _run(tmp_path / "runs" / "dead", True)
    _run(tmp_path / "runs" / "ok", False)
    code, out, err = run_cli(["summary", str(tmp_path / "runs" / "dead")], capsys)
    assert code == 0
    assert "probe check dead_gradients (excluded from report verdicts): w0" in err
    runs = bnn_probe.reports.load.load_runs([tmp_path / "runs"])
    keep, notes = run_warnings.exclude_blocking(runs)
    assert [r.path.name for r in keep] == ["ok"] and len(notes) == 1 and "dead" in notes[0]
    keep_all, notes_all = run_warnings.exclude_blocking([r for r in runs if r.path.name == "dead"])
    assert len(keep_all) == 1 and notes_all[0].startswith("kept although blocked")
    from bnn_probe.reports.build import build_report

    html = build_report([tmp_path / "runs"], tmp_path / "rep", formats=("md",), progress=False)
    md = (html / "report.md").read_text() if html.is_dir() else html.read_text()
    # report.md escapes Markdown metacharacters of untrusted text (docs/trust.md): "_" is written as "\\_"
    assert "left out of the analyses and verdicts: dead: dead\\_gradients in w0" in md


def test_checks_off(tmp_path):
    _, _, probe = _bop(tmp_path / "r", dead="all", check_every=0)
    probe.close()
    assert _kinds(tmp_path / "r") == set()


def test_resume_keeps_earlier_warnings(tmp_path):
    model, opt, probe = _bop(tmp_path / "r", dead="w1")
    sd = probe.state_dict()
    probe.close()
    probe = bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False, check_every=1, resume=True)
    probe.load_state_dict(sd)
    _steps(model, opt, 2, grad=lambda p: torch.ones_like(p))
    probe.close()
    assert _kinds(tmp_path / "r") == {("dead_gradients", "w1")}


class _Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3, 4))
        self.b = nn.Parameter(torch.randn(3, 4))
        self.c = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return x @ self.a.T + torch.matmul(x, self.b.t().contiguous()) + x @ torch.sign(self.c).T


def test_too_broad_selection_sees_through_reshapes(tmp_path):
    model = _Transposed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False, binary=["a", "b", "c"])
    model(torch.randn(2, 4))
    probe.close()
    assert _kinds(tmp_path / "r") == {("not_binarized", "a"), ("not_binarized", "b")}


def test_declared_intervention_is_not_a_change_outside_step(tmp_path):
    from bnn_probe.interventions import reset_inertia

    model = Multi(0, latent=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    probe = bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False, check_every=1)
    _steps(model, opt, 3, between=lambda t: reset_inertia(opt, mode="constant") if t == 1 else None)
    probe.close()
    assert _kinds(tmp_path / "r") == set()
    assert [e["kind"] for e in probe.interventions] == ["reset_inertia"]


@pytest.mark.skipif(not cpu_pass.available(), reason="the compiled pass is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_check_rows_equal_the_torch_expressions(tmp_path, monkeypatch, dtype):
    """The run checks' statistics from one compiled pass (``bnnp_check``) and the weights' comparison by
    ``bnnp_count_ne`` equal the torch expressions they replace, with NaN and ±inf in m and g, weights of 0 and 0.5,
    a layer whose binarizer keeps 0, a layer without a gradient and one with weights edited outside the step."""
    from bnn_probe.optim import Bop

    results, rows = [], []
    compiled_row = checks._compiled_row
    monkeypatch.setattr(checks, "_compiled_row", lambda *a: rows.append(r := compiled_row(*a)) or r)
    for compiled in (True, False):
        if not compiled:
            assert sum(r is not None for r in rows) == len(rows) == 12  # 4 layers × 3 check steps, all compiled
            monkeypatch.setattr(checks, "_kernels", lambda *ts: None)
        model = Multi(0).to(dtype)
        with torch.no_grad():
            model.w0.mul_(0.5)
            model.w3[0] = 0.0
        opt = Bop(model.parameters(), gamma=0.5, threshold=0.1)
        probe = bnn_probe.attach(model, opt, tmp_path / str(compiled), tensorboard=False, check_every=1,
                                 binarizer={"w3": Sign(zero=0)})
        params = list(model.parameters())
        for t in range(3):
            for i, p in enumerate(params):
                p.grad = None if (t == 2 and i == 1) else torch.full_like(p, 1e-3 * (i + 1))
            if t == 1:
                params[0].grad.view(-1)[:2] = torch.tensor([float("nan"), float("-inf")], dtype=dtype)
            opt.step()
            if t == 1:
                opt.state[params[2]]["exp_avg"].view(-1)[:3] = torch.tensor([float("inf"), float("nan"), -7.0])
            with torch.no_grad():
                params[1].view(-1)[:4] = 0.25  # changed outside the step
        assert len(probe.checks._stats) == 3 and len(probe.checks._changed) == 2
        results.append(([x for _, x in probe.checks._stats], [x for _, x in probe.checks._changed]))
        probe.close()
    (stats_c, changed_c), (stats_t, changed_t) = results
    for a, b in zip(stats_c + changed_c, stats_t + changed_t, strict=True):
        assert a.dtype == b.dtype and torch.equal(a.nan_to_num(-12345.0), b.nan_to_num(-12345.0))
    # the rows: [max|g|, max|m|, non-finite state entries, |w| != 1, zeros] per layer, at steps 1, 2, 3
    assert torch.isnan(stats_c[1][0, 0]) and torch.isnan(stats_c[2][2, 1]) and stats_c[2][2, 2] == 2
    assert stats_c[0][3, 4] == 1 and torch.isnan(stats_c[0][0, 4]) and stats_c[0][0, 3] == model.w0.numel()
    assert torch.isnan(stats_c[2][1, 0]) and (changed_c[0] > 0).tolist() == [False, True, False, False]

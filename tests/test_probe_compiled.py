"""The probe's device path (probe/fused.py: pure torch, eager or ``torch.compile``-d) against the compiled CPU pass
(probe/onepass.py): the same logged values on multi-layer setups (integers exactly, floats to 1e-12 relative), and a
compiled step that compiles once, not per step, while τ / the clip value / the learning rate change."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from _probe_helpers import MULTI_KINDS, multi_setup

import bnn_probe
from bnn_probe.probe import cpu_pass

OPTS = {"tensorboard": False, "quantile_sample": 100, "track": 8, "events_per_layer": 2000, "hist_every": 3,
        "snapshot_every": 4}


def _run(path, kind: str, steps: int, vary: bool = False, **opts):
    model, opt = multi_setup(kind)
    probe = bnn_probe.attach(model, opt, path, **OPTS, **opts)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.7) if vary and kind == "adam" else None
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 0.5
        if vary and kind == "bop":  # τ changes every step (a tensor input of the compiled step, no recompile)
            opt.param_groups[0]["threshold"] = 0.05 * (1 + 0.25 * (i % 4))
        if vary and kind == "adam":  # clip value changes (clip per layer enters as a tensor)
            opt.bnn_clip_value = 0.2 + 0.05 * (i % 3)
            with torch.no_grad():
                for p in model.parameters():
                    p.clamp_(-opt.bnn_clip_value, opt.bnn_clip_value)
        opt.step()
        if sched is not None:
            sched.step()
    probe.close()
    return probe, bnn_probe.load_run(path)


def _same(a, b) -> None:
    for name in ("steps", "events", "tracked", "hists", "snapshots", "weight_flips"):
        x, y = getattr(a, name), getattr(b, name)
        assert len(x) > 0, name
        x = x.reset_index(drop=True)
        y = y.reset_index(drop=True)
        if name == "snapshots":
            assert [bytes(v) for v in x.iloc[:, -1]] == [bytes(v) for v in y.iloc[:, -1]]
            x, y = x.iloc[:, :-1], y.iloc[:, :-1]
        pd.testing.assert_frame_equal(x, y, check_exact=False, rtol=1e-12, atol=0, obj=name)
    ints = ["flips", "c2i_diff", "nonfinite_grads", "sign_hash"]
    pd.testing.assert_frame_equal(a.steps[ints], b.steps[ints], check_exact=True)  # integer columns: exactly


@pytest.mark.parametrize("kind", MULTI_KINDS)
@pytest.mark.skipif(not cpu_pass.available(), reason="the compiled CPU pass is not built: one path only")
def test_forced_device_path_equals_cpu_path(tmp_path, kind):
    pc, cpu = _run(tmp_path / "cpu", kind, 6)
    pd_, dev = _run(tmp_path / "dev", kind, 6, device_path=True)
    assert all(not g.fused for g in pc.groups) and all(g.fused and not g.compile_probe for g in pd_.groups)
    assert cpu.steps.flips.sum() > 0
    _same(cpu, dev)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bop", "adam"])
def test_compiled_equals_cpu_path_and_compiles_once(tmp_path, kind):
    from torch._dynamo.utils import counters

    steps = 24
    _, cpu = _run(tmp_path / "cpu", kind, steps, vary=True)
    before = counters["stats"]["unique_graphs"]
    with _no_compile_warning():
        probe, comp = _run(tmp_path / "comp", kind, steps, vary=True, compile_probe=True)
    graphs = counters["stats"]["unique_graphs"] - before
    assert all(g.fused and g._step.compiled for g in probe.groups)  # compiled, not fallen back to eager
    assert 1 <= graphs <= 2, graphs  # once (per log/track/events combination), not once per step
    assert comp.meta["probe"]["compile_probe"] is True
    assert cpu.steps.flips.sum() > 0
    if kind == "bop":
        assert cpu.steps.threshold.nunique() > 1
    _same(cpu, comp)


class _no_compile_warning:  # noqa: N801
    def __enter__(self):
        import warnings

        self.cm = warnings.catch_warnings(record=True)
        self.w = self.cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self.cm.__exit__(*exc)
        bad = [str(w.message) for w in self.w if "torch.compile of the probe" in str(w.message)]
        assert not bad, bad
        return False

"""CUDA-graph replay of the probe's device path (probe/cuda_graph.py).

On any machine: the packing of a step's outputs into one byte buffer and back is exact; the graph path's staging
(fixed-address inputs, τ and clip values written in place) run without a graph (``cuda_graphs=True`` on the CPU)
logs exactly what the device path logs without it, while τ, the clip value and the learning rate change every step.
On CUDA (marked ``gpu``): graphs are captured and replayed and the log equals the one without graphs, eager and
compiled, also when a parameter's storage is replaced mid-run (a new capture).
"""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch
from _probe_helpers import MULTI_KINDS, multi_setup

import bnn_probe
from bnn_probe.probe.binarizers import Sign
from bnn_probe.probe.cuda_graph import StepGraphs, pack, unpack

OPTS = {"tensorboard": False, "quantile_sample": 100, "track": 8, "events_per_layer": 50, "hist_every": 3,
        "snapshot_every": 4, "quantile_every": 2, "track_every": 3}


def test_pack_unpack_round_trip_is_exact_and_aligned():
    g = torch.Generator().manual_seed(0)
    out = {"ints": torch.randint(-2**62, 2**62, (3, 4), generator=g),
           "floats": torch.randn(3, 7, generator=g, dtype=torch.float64),
           "tracked": (torch.rand(5, generator=g) > 0.5, torch.randn(5, 2, generator=g, dtype=torch.float64)),
           "events": (torch.randint(0, 9, (6, 2), generator=g), torch.randn(6, 2, generator=g).double())}
    out["floats"][0, 0] = float("nan")
    buf, spec = pack(out)
    assert buf.dtype == torch.uint8 and all(off % 8 == 0 for *_, off, _ in spec)
    assert buf.numel() == 3 * 4 * 8 + 3 * 7 * 8 + 8 + 5 * 2 * 8 + 2 * 6 * 2 * 8  # 5 bools padded to 8 bytes
    back = unpack(buf.clone(), spec)
    assert set(back) == set(out)
    for k, v in out.items():
        for a, b in zip(v if isinstance(v, tuple) else (v,), back[k] if isinstance(v, tuple) else (back[k],),
                        strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a.view(-1).view(torch.uint8),
                               b.view(torch.uint8) if b.dtype == torch.bool else b.reshape(-1).view(torch.uint8))


def _run(path, kind: str, steps: int, device: str = "cpu", replace_at: int | None = None, **opts):
    model, opt = multi_setup(kind)
    model.to(device)
    probe = bnn_probe.attach(model, opt, path, **OPTS, **opts)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.7) if kind == "adam" else None
    g = torch.Generator().manual_seed(0)
    tau_ptrs = set()
    for i in range(steps):
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=g) * 0.5).to(device)
        if kind == "bop":  # τ changes every step: written into the same device tensor (no new graph)
            opt.param_groups[0]["threshold"] = 0.05 * (1 + 0.25 * (i % 4))
        if kind == "sgd_clip":
            opt.bnn_clip_value = 0.2 + 0.05 * (i % 3)
        if replace_at is not None and i == replace_at:  # a parameter's storage replaced: the graphs re-capture
            p = next(model.parameters())
            p.data = p.data.clone()
        opt.step()
        if sched is not None:
            sched.step()
        grp = probe.groups[0]
        if grp.fused and grp.bop:
            tau_ptrs.add(grp.tau32_l.data_ptr())
    probe.close()
    return probe, bnn_probe.load_run(path), tau_ptrs


def _same_exactly(a, b) -> None:
    for name in ("steps", "events", "tracked", "hists", "snapshots", "weight_flips"):
        x, y = getattr(a, name).reset_index(drop=True), getattr(b, name).reset_index(drop=True)
        assert len(x) > 0, name
        if name == "snapshots":
            assert [bytes(v) for v in x.iloc[:, -1]] == [bytes(v) for v in y.iloc[:, -1]]
            x, y = x.iloc[:, :-1], y.iloc[:, :-1]
        pd.testing.assert_frame_equal(x, y, check_exact=True, obj=name)


@pytest.mark.parametrize("kind", MULTI_KINDS)
def test_graph_staging_without_capture_logs_the_same(tmp_path, kind):
    p0, plain, _ = _run(tmp_path / "plain", kind, 9, device_path=True, cuda_graphs=False)
    p1, staged, tau_ptrs = _run(tmp_path / "staged", kind, 9, device_path=True, cuda_graphs=True)
    assert all(g.graphs is None for g in p0.groups)
    assert any(g.graphs is not None and not g.graphs.capture for g in p1.groups)
    assert plain.steps.flips.sum() > 0
    _same_exactly(plain, staged)
    if kind == "bop":
        assert len(tau_ptrs) == 1  # τ changed 9 times, the device vector stayed where it was


def test_binarizer_layers_run_without_graphs(tmp_path):
    model, opt = multi_setup("bop")
    probe = bnn_probe.attach(model, opt, tmp_path / "b", tensorboard=False, device_path=True, cuda_graphs=True,
                             binarizer=Sign(zero=-1))
    assert [(g.any_custom, g.graphs) for g in probe.groups] == [(True, None)]
    probe.close()


def test_step_graphs_without_capture_pack_each_step():
    graphs = StepGraphs(torch.device("cpu"))
    assert not graphs.capture
    x = torch.arange(4)
    out = graphs.run((True,), (1,), lambda: {"ints": x * 2})
    assert torch.equal(out["ints"], x * 2) and out["ints"].data_ptr() != x.data_ptr()


def test_one_compiled_step_per_layout(tmp_path):
    """Probes on the same layout share one step (a study's runs compile once); another layout gets its own copy of
    the step's code object (Dynamo's cache is per code object: layouts do not use up each other's recompiles)."""
    pa = [bnn_probe.attach(*multi_setup("bop"), tmp_path / f"a{i}", tensorboard=False, device_path=True)
          for i in range(2)]
    pb = bnn_probe.attach(*multi_setup("adam"), tmp_path / "b", tensorboard=False, device_path=True)
    sa, sa2, sb = pa[0].groups[0]._step, pa[1].groups[0]._step, pb.groups[0]._step
    assert sa is sa2 and sb is not sa
    assert sa.eager.__code__ is not sb.eager.__code__
    assert sa.eager.__code__.co_code == sb.eager.__code__.co_code
    for p in (*pa, pb):
        p.close()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind, compile_probe", [(k, False) for k in ("bop", "bop_per_layer_tau", "bop2nd_bc",
                                                                        "sgd_clip", "adam", "mixed")]
                         + [("bop", True), ("adam", True)])
def test_cuda_graphs_log_the_same(tmp_path, kind, compile_probe):
    with warnings.catch_warnings():
        # no failed capture, no failed compile (recompile limit): bnn-probe's warnings raise
        warnings.filterwarnings("error", message="bnn-probe", category=RuntimeWarning)
        p0, plain, _ = _run(tmp_path / "plain", kind, 12, "cuda", compile_probe=compile_probe, cuda_graphs=False)
        p1, graphed, tau_ptrs = _run(tmp_path / "graph", kind, 12, "cuda", compile_probe=compile_probe,
                                     cuda_graphs=True)
    gs = [g.graphs for g in p1.groups if g.graphs is not None]
    assert gs and all(g.capture and not g.failed and g.moves == 0 for g in gs)
    assert not gs[0].enabled and not gs[0].graphs  # closed: graphs released
    assert sum(g.captured for g in gs) >= 1 and sum(g.replays for g in gs) >= 4
    assert all(g._step.compiled == compile_probe for g in p1.groups)
    assert graphed.meta["probe"]["cuda_graphs"] is True
    assert plain.steps.flips.sum() > 0
    _same_exactly(plain, graphed)
    if kind == "bop":
        assert len(tau_ptrs) == 1


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_recapture_when_a_parameter_moves(tmp_path):
    _, plain, _ = _run(tmp_path / "plain", "bop", 12, "cuda", replace_at=6, cuda_graphs=False)
    p1, graphed, _ = _run(tmp_path / "graph", "bop", 12, "cuda", replace_at=6, cuda_graphs=True)
    g = p1.groups[0].graphs
    assert g.moves == 1 and g.captured >= 2 and not g.failed
    _same_exactly(plain, graphed)


@pytest.mark.gpu
@needs_cuda
def test_cuda_probed_bop_step_has_no_host_synchronisation(tmp_path):
    """After the graphs are captured, a probed Bop step on CUDA (the default Triton step, the probe's hooks and its
    replayed measurement, quantile and non-quantile steps) never waits for the GPU: torch's sync debug mode raises
    on any synchronising call."""
    model, opt = multi_setup("bop")
    model.cuda()
    ps = list(model.parameters())
    opt = type(opt)(ps, gamma=0.3, threshold=0.05)
    probe = bnn_probe.attach(model, opt, tmp_path / "s", **{**OPTS, "hist_every": 0, "snapshot_every": 0},
                             flush_secs=1e9, check_every=0)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def steps(k: int) -> None:
        for _ in range(k):
            for p in ps:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 0.5
            opt.step()

    steps(25)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps(12)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert probe.groups[0].graphs.replays >= 20
    probe.close()
    run = bnn_probe.load_run(tmp_path / "s")
    assert run.steps.step.max() == 37 and run.steps.flips.sum() > 0

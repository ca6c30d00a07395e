"""Study registry and runner: grids, pair tagging, reserved names, reuse of finished runs, parallel jobs, report."""

import json
from pathlib import Path

import pytest

from bnn_probe import studies
from bnn_probe.errors import BnnProbeError
from bnn_probe.studies import STUDIES, StudyOptions, parse_seeds, plan_study, run_study

TINY = StudyOptions(epochs=1, widths=(16,))


def test_hyperparams_grid_is_fig1():
    specs = plan_study("hyperparams", StudyOptions(seeds=(0, 1)))
    assert len(specs) == 10
    pts = {(s.config.gamma, s.config.threshold) for s in specs}
    assert pts == {(1e-2, 1e-6), (1e-3, 1e-6), (1e-4, 1e-6), (1e-3, 0.0), (1e-3, 1e-5)}
    assert all(s.config.optimizer == "bop" and s.config.epochs == 20 for s in specs)
    assert "bop-g1e-2-t1e-6-s1" in {s.name for s in specs}


def test_inertia_runs_and_pairs():
    specs = {s.name: s.config for s in plan_study("inertia", StudyOptions())}
    t1 = {f"theorem1-{arm}-{m}-s0" for arm in ("unclipped", "clipped") for m in ("c1", "rounding", "c3", "c10", "c100")}
    assert set(specs) - {s.name for s in studies.intervention_runs(StudyOptions())} == {
        "bop-s0", "latent-adam-clip-s0", "latent-sgd-s0", "tau0-bop-s0", "tau0-latent-sgd-s0"} | t1
    ref, c3 = specs["theorem1-unclipped-c1-s0"], specs["theorem1-unclipped-c3-s0"]
    assert (c3.lr, c3.init_scale) == (3 * ref.lr, 3 * ref.init_scale)  # C = 3: not a power of two
    rnd = specs["theorem1-unclipped-rounding-s0"]
    assert (rnd.lr, rnd.init_scale) == (ref.lr * (1 + 2.0 ** -22), ref.init_scale * (1 + 2.0 ** -22))
    for name in t1:
        cfg = specs[name]
        clipped = "-clipped-" in name
        assert (cfg.optimizer, cfg.clip, cfg.ste, cfg.momentum) == (
            "latent-sgd", clipped, "clipped" if clipped else "identity", 0.0)
        assert cfg.extra["theorem1"]["arm"] == ("clipped" if clipped else "unclipped")
        assert cfg.snapshot_every == studies.SNAPSHOT_EVERY and cfg.track == 0
    assert specs["theorem1-clipped-c100-s0"].extra["theorem1"] == {"C": 100.0, "arm": "clipped", "role": "scaled"}
    assert specs["bop-s0"].extra == {"bop_vs_latent": "bop"}
    assert specs["latent-adam-clip-s0"].extra == {"bop_vs_latent": "latent"}
    assert specs["latent-adam-clip-s0"].latent_init == "glorot"
    bop, sgd = specs["tau0-bop-s0"], specs["tau0-latent-sgd-s0"]
    assert (bop.optimizer, bop.threshold, bop.pair_role) == ("bop", 0.0, "a")
    assert (sgd.lr, sgd.decoupled_decay, sgd.momentum, sgd.clip) == (bop.gamma, 1.0, 0.0, False)
    assert sgd.pair == bop.pair == "tau0-s0"
    assert specs["latent-adam-clip-s0"].clip is True
    assert studies.default_seeds("inertia") == (0, 1, 2) and studies.default_seeds("thresholds") == (0,)


def test_thresholds_grid_and_unknown_names_fail():
    assert "thresholds" in STUDIES and "thresholds" in studies.study_names()
    specs = {s.name: s.config for s in plan_study("thresholds", StudyOptions())}
    # per seed 10 (3 global τ, fan-in, calibrated, normalized without and with flip feedback, Bop2ndOrder, latent,
    # no-BN), the width sweep with 3 seeds (12) and the one-layer τ sweep (a base run + 4 layers × 4 factors)
    assert len(specs) == 10 + 12 + 17 and specs["fan-in-s0"].widths == (2048, 64, 1024)
    assert specs["normalized-s0"].threshold_policy == "normalized" and not specs["normalized-s0"].threshold_balance
    bal = specs["normalized-balance-s0"]
    assert (bal.threshold_policy, bal.threshold_balance, bal.threshold_every) == ("normalized", 0.5, 1)
    assert specs["calibrated-s0"].threshold_policy == "calibrated" and specs["calibrated-s0"].target_flip_ratio == 1e-3
    assert (specs["no-bn-s0"].batch_norm, specs["no-bn-s0"].weight_scale) == (False, "fan_in")
    assert [specs[f"sweep-w{w}-s0"].widths for w in (64, 256, 1024, 4096)] == [(w, 256) for w in (64, 256, 1024, 4096)]
    with pytest.raises(BnnProbeError, match="unknown study 'nope'"):
        plan_study("nope", StudyOptions())


def test_all_is_a_short_version_of_every_available_study():
    specs = plan_study("all", StudyOptions())
    names = [s.name for s in specs]
    # hyperparams 5; inertia 15 (Bop, latent Adam, latent SGD, Theorem 1 C = 100 × 2 arms × 3, τ = 0 pair, 2 reset
    # pairs); thresholds: 10 + width sweep 3 × 4 + τ sweep 5
    assert len(names) == 47 and len(set(names)) == 47
    assert "inertia-theorem1-clipped-c3-s0" not in names and "inertia-theorem1-clipped-c100-s0" in names
    assert {n.split("-")[0] for n in names} == {"hyperparams", "inertia", "thresholds"}
    epochs = {n.split("-")[0]: s.config.epochs for n, s in zip(names, specs, strict=True)}
    assert epochs == {"hyperparams": 6, "inertia": 6, "thresholds": 4}
    sweep = [s.config.widths[0] for s in specs if "-sweep-w" in s.name]
    assert max(sweep) <= 256  # the quick grid of the thresholds width sweep
    quick = plan_study("all", StudyOptions(quick=True))
    assert {s.config.epochs for s in quick} == {2} and {s.config.hist_every for s in quick} == {0}
    assert {s.config.epochs for s in plan_study("all", StudyOptions(epochs=3))} == {3}


def test_parse_seeds():
    assert parse_seeds("0,1,2") == (0, 1, 2)
    for bad in ("a", "1,1", "-1", ""):
        with pytest.raises(BnnProbeError):
            parse_seeds(bad)


def test_register_study_extends_the_registry(monkeypatch):
    monkeypatch.setitem(STUDIES, "mini", STUDIES["hyperparams"])

    @studies.register_study("mini", "test study", in_all=False)
    def _mini(o):
        return [studies.RunSpec("one", o.base(0, 1, 1))]

    assert [s.name for s in plan_study("mini", StudyOptions())] == ["one"]
    assert all(not n.startswith("mini-") for n in (s.name for s in plan_study("all", StudyOptions())))


def test_run_study_reuses_finished_runs_and_refuses_others(tmp_path, monkeypatch):
    calls = []

    def fake_report(runs, out_dir, progress=True):
        calls.append([Path(r).name for r in runs])
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "report.html").write_text("<html></html>")
        return Path(out_dir) / "report.html"

    import bnn_probe.reports as reports

    monkeypatch.setattr(reports, "build_report", fake_report)
    msgs = []
    path = run_study("hyperparams", tmp_path / "s", TINY, progress=False, echo=msgs.append)
    assert path == tmp_path / "s" / "report" / "report.html"
    assert len(calls) == 1 and len(calls[0]) == 5
    assert all((tmp_path / "s" / n / "meta.json").exists() for n in calls[0])
    run_study("hyperparams", tmp_path / "s", TINY, progress=False, echo=msgs.append)
    assert any("reusing 5 finished run(s)" in m for m in msgs)
    meta = tmp_path / "s" / calls[0][0] / "meta.json"
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps({**m, "status": "running"}))  # as if killed
    run_study("hyperparams", tmp_path / "s", TINY, progress=False, echo=msgs.append)
    assert any("retraining 1 unfinished" in m for m in msgs)
    assert json.loads(meta.read_text())["status"] == "finished"
    with pytest.raises(FileExistsError, match="holds another run"):
        run_study("hyperparams", tmp_path / "s", StudyOptions(epochs=1, widths=(8,)), progress=False,
                  echo=msgs.append)


def test_report_failure_is_one_line(tmp_path, monkeypatch):
    import bnn_probe.reports as reports

    def broken(runs, out_dir, progress=True):
        raise ValueError("math domain error")

    monkeypatch.setattr(reports, "build_report", broken)
    with pytest.raises(BnnProbeError, match="runs are in .*building the report failed.*ValueError") as e:
        run_study("hyperparams", tmp_path / "s", TINY, progress=False, echo=lambda s: None)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_parallel_jobs_give_the_same_runs_as_serial(tmp_path):
    import bnn_probe

    opts = StudyOptions(epochs=1, widths=(16,))
    run_study("inertia", tmp_path / "p", opts, jobs=0, progress=False, report=False, echo=lambda s: None)
    for s in plan_study("inertia", opts)[:2]:  # two of the runs again, in-process
        studies._run_one(s.name, s.config.to_dict(), str(tmp_path / "q" / s.name), False, False)
        a = bnn_probe.load_run(tmp_path / "p" / s.name)
        b = bnn_probe.load_run(tmp_path / "q" / s.name)
        assert a.status == "finished"
        assert a.steps[["step", "layer", "sign_hash"]].equals(b.steps[["step", "layer", "sign_hash"]])
        assert a.train.dropna(subset=["val_accuracy"])["val_accuracy"].equals(
            b.train.dropna(subset=["val_accuracy"])["val_accuracy"])
    assert len(list((tmp_path / "p").iterdir())) == len(plan_study("inertia", opts))
    assert json.loads((tmp_path / "p" / "tau0-bop-s0" / "meta.json").read_text())["config"]["pair_role"] == "a"


def test_a_study_run_twice_reuses_its_per_layer_threshold_runs(tmp_path, monkeypatch):
    """Training records the threshold policy's per-layer τ in config.extra; the re-run must still see the same run."""
    from dataclasses import replace

    def mini(o):
        base = replace(o.base(0, 1, 1), optimizer="bop", gamma=1e-3, threshold=1e-6)
        return [studies.RunSpec("fan-in", replace(base, threshold_policy="fan-in", fan_in_exponent=0.5)),
                studies.RunSpec("calibrated", replace(base, threshold_policy="calibrated", target_flip_ratio=1e-3))]

    monkeypatch.setitem(STUDIES, "mini", studies.Study("mini", "two per-layer τ runs", mini))
    msgs = []
    run_study("mini", tmp_path / "s", TINY, progress=False, report=False, echo=msgs.append)
    stored = json.loads((tmp_path / "s" / "fan-in" / "meta.json").read_text())["config"]["extra"]
    assert "threshold_policy" in stored  # what made the second run fail before
    meta = tmp_path / "s" / "calibrated" / "meta.json"
    m = json.loads(meta.read_text())
    assert m["config"]["amp"] == "none"
    del m["config"]["amp"]  # as if made before the option existed: it ran with the default
    meta.write_text(json.dumps(m))
    run_study("mini", tmp_path / "s", TINY, progress=False, report=False, echo=msgs.append)
    assert any("reusing 2 finished run(s)" in m for m in msgs) and any("trained 0 run(s)" in m for m in msgs)
    with pytest.raises(FileExistsError, match="holds another run"):  # a real difference is still one
        run_study("mini", tmp_path / "s", StudyOptions(epochs=2, widths=(16,)), progress=False, report=False,
                  echo=msgs.append)

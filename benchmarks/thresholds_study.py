"""The `thresholds` study: threshold policies, the no-batch-norm variant, a controlled width sweep and the
from-report feedback test, on digits (MLP 64 → 2048 → 64 → 1024 → 10) and MNIST-1D (1-D conv net).

Every run is trained with the probe attached and written as a run directory; the analyses then read the logs only.

    python benchmarks/thresholds_study.py policies --dataset digits --out runs/thresholds [--quick]
    python benchmarks/thresholds_study.py sweep    --dataset digits --out runs/sweep
    python benchmarks/thresholds_study.py feedback --dataset digits --out runs/feedback
    python benchmarks/thresholds_study.py analyse  --out runs   # reads runs/{policies,sweep,feedback}/<dataset>

Training: batch 64, Bop (γ = 1e-3 unless said) for the binary weights, Adam 1e-2 for batch norm; latent reference:
Adam 1e-3 on latent weights with clipping to [−1, 1] (BinaryNet). No-BN variant: weights scaled by fan_in^−1/2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import bnn_probe
from bnn_probe.data import load_dataset
from bnn_probe.models import build_model
from bnn_probe.nn import binary_parameters, named_binary_parameters
from bnn_probe.optim import Bop, Bop2ndOrder, CaseOptimizer, binary_init_, clip_latent_weights
from bnn_probe.optim import thresholds as T

MODELS = {"digits": ("mlp", [2048, 64, 1024]), "mnist1d": ("cnn1d", None)}
GAMMA = 1e-3


def train_run(out: Path, dataset: str, seed: int, epochs: int, optimizer: str = "bop", policy: dict | None = None,
              widths=None, model: str | None = None, batch_norm: bool = True, scale: str = "none",
              gamma: float = GAMMA, threshold: float = 1e-6, variant: str = "", batch_size: int = 64) -> Path:
    """Train one run with the probe attached; returns its directory (skips a finished run already there)."""
    if (out / "meta.json").exists() and json.loads((out / "meta.json").read_text()).get("status") == "finished":
        return out
    torch.manual_seed(seed)
    ds = load_dataset(dataset)
    name, w = MODELS[dataset]
    name = model or name
    widths = widths if widths is not None else w
    net = build_model(name, in_shape=ds.in_shape, num_classes=ds.num_classes, widths=widths, batch_norm=batch_norm,
                      scale=scale)
    real = [p for p in net.parameters() if not any(p is b for b in binary_parameters(net))]
    cfg = {"dataset": dataset, "model": name if widths is None else f"{name} {widths}", "seed": seed,
           "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer, "gamma": gamma,
           "batch_norm": batch_norm, "weight_scale": scale, "variant": variant}
    ctl = None
    if optimizer in ("bop", "bop2nd"):
        binary_init_(net, seed=seed)
        pol = T.make_policy(**(policy or {"name": "global", "threshold": threshold}),
                            fan_ins=[T.layer_fan_in(p) for p in binary_parameters(net)])
        groups = pol.param_groups(named_binary_parameters(net), gamma=gamma)
        bop = Bop(groups) if optimizer == "bop" else Bop2ndOrder(groups)
        opt = CaseOptimizer(bop, torch.optim.Adam(real, lr=1e-2)) if real else CaseOptimizer(bop)
        cfg.update(threshold=threshold, threshold_policy=pol.describe())
    else:  # latent Adam reference
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        cfg.update(threshold=None, threshold_policy=None, lr=1e-3)
    probe = bnn_probe.attach(net, opt, out, config=cfg, tensorboard=False, hist_every=None, snapshot_every=None,
                             track=16)
    if optimizer in ("bop", "bop2nd"):
        ctl = pol.attach(opt)
    gen = torch.Generator().manual_seed(seed)
    lossf = torch.nn.CrossEntropyLoss()
    with probe:
        for epoch in range(epochs):
            net.train()
            tl, tc, tn = 0.0, 0, 0
            for x, y in ds.batches(batch_size, gen):
                opt.zero_grad(set_to_none=True)
                logits = net(x)
                loss = lossf(logits, y)
                loss.backward()
                opt.step()
                if optimizer == "latent":
                    clip_latent_weights(binary_parameters(net))
                tl += float(loss.detach()) * len(y)
                tc += int((logits.argmax(1) == y).sum())
                tn += len(y)
            net.eval()
            with torch.no_grad():
                lv = net(ds.x_val)
                va = float((lv.argmax(1) == ds.y_val).float().mean())
                vl = float(lossf(lv, ds.y_val))
            probe.log(epoch=epoch + 1, train_loss=tl / tn, train_accuracy=tc / tn, val_loss=vl, val_accuracy=va)
    if ctl is not None:
        (out / "controller_history.json").write_text(json.dumps(ctl.history))
    return out


def policies(args) -> None:
    """Global τ at three values, fan-in, calibrated, Bop2ndOrder, latent Adam, no-BN (Bop, fan_in scale)."""
    taus = [2e-7, 1e-6, 5e-6]
    grid = [(f"global τ={t:g}", dict(policy={"name": "global", "threshold": t}, threshold=t)) for t in taus]
    grid += [("fan-in a=0.5", dict(policy={"name": "fan-in", "threshold": 1e-6, "fan_in_exponent": 0.5})),
             ("calibrated r*=1e-3", dict(policy={"name": "calibrated", "threshold": 1e-6,
                                                 "target_flip_ratio": 1e-3})),
             ("Bop2ndOrder τ=1e-3", dict(optimizer="bop2nd", policy={"name": "global", "threshold": 1e-3},
                                         threshold=1e-3)),
             ("latent Adam", dict(optimizer="latent")),
             ("global τ=1e-6 no-BN scale=fan_in", dict(policy={"name": "global", "threshold": 1e-6}, batch_norm=False,
                                                       scale="fan_in"))]
    seeds = range(args.seeds)
    for variant, kw in grid:
        for s in seeds:
            slug = variant.replace(" ", "_").replace("τ=", "tau").replace("*", "")
            t0 = time.time()
            train_run(Path(args.out) / args.dataset / f"{slug}_s{s}", args.dataset, s, args.epochs, variant=variant,
                      **kw)
            print(f"{args.dataset} {variant} seed {s}: {time.time() - t0:.1f}s", flush=True)


def sweep(args) -> None:
    """Controlled width sweep: MLP in → W → 256 → 10, W varied; fc2 (fan-in W, fan-out 256, depth 2) is measured."""
    for W in args.widths:
        for s in range(args.seeds):
            t0 = time.time()
            train_run(Path(args.out) / args.dataset / f"W{W}_s{s}", args.dataset, s, args.epochs, model="mlp",
                      widths=[W, 256], policy={"name": "global", "threshold": args.tau}, threshold=args.tau,
                      variant=f"sweep W={W}")
            print(f"sweep {args.dataset} W={W} seed {s}: {time.time() - t0:.1f}s", flush=True)


def _method_table(run_dirs: list[Path], out: Path, method: str) -> None:
    """thresholds.csv recommended by ``method`` ("tail", "flow", …) from the runs' layer table: the function and
    columns the report uses, without building the rest of the report. ``run_dirs``: the run to recommend from,
    after the run it was fed from (if any), as a report of both would see them."""
    from bnn_probe.reports.feedback import sources
    from bnn_probe.reports.thresholds import layer_table, recommended_thresholds
    runs = [bnn_probe.load_run(p) for p in run_dirs]
    rec = recommended_thresholds(layer_table(runs), method=method, sources=sources(runs))
    (out / "tables").mkdir(parents=True, exist_ok=True)
    cols = ["layer", "fan_in", "n_weights", "flip_ratio", "recommended_threshold", "run", "family", "threshold",
            "ratio_to_current", "bound", "elasticity", "elasticity_at_recommended", "mean_overshoot", "margin_sd",
            "method"]
    rec.table[cols].to_csv(out / "tables" / "thresholds.csv", index=False)


def _seeds(args) -> list[int]:
    return list(args.seed_list) if getattr(args, "seed_list", None) else list(range(args.seeds))


def feedback(args) -> None:
    """global-τ run → report → from_report run, same model/data/seed; CV of per-layer flip ratios before/after.
    With ``--rounds 2`` the from-report run's own report is fed back once more (``from_report_r2_s<seed>``).
    ``--method tail`` / ``flow``: the thresholds recommended by tail matching / the flow model instead
    (``from_tail…``, ``tailreport…``; ``from_flow…``, ``flowreport…``). ``--seed-list``: these seeds instead of
    0 … seeds − 1."""
    from bnn_probe.reports import build_report
    from bnn_probe.reports.build import ReportOptions
    method = getattr(args, "method", "ladder")
    tag_m = "" if method == "ladder" else method
    for s in _seeds(args):
        prev = Path(args.out) / args.dataset / f"global_s{s}"
        train_run(prev, args.dataset, s, args.epochs, policy={"name": "global", "threshold": args.tau},
                  threshold=args.tau, variant=f"global τ={args.tau:g}", gamma=args.gamma, widths=args.mlp_widths)
        chain = [prev]
        for k in range(1, args.rounds + 1):
            tag = "" if k == 1 else f"_r{k}"
            rep = Path(args.out) / args.dataset / f"{tag_m}report{tag}_s{s}"
            if not (rep / "tables" / "thresholds.csv").exists():
                if tag_m:
                    _method_table(chain[-2:], rep, method)
                else:
                    build_report([prev], rep, formats=("md",), progress=False,
                                 options=ReportOptions(threshold_method="ladder"))
            nxt = Path(args.out) / args.dataset / f"from_{tag_m or 'report'}{tag}_s{s}"
            train_run(nxt, args.dataset, s, args.epochs,
                      policy={"name": "from-report", "thresholds_csv": str(rep / "tables" / "thresholds.csv"),
                              "report_run": bnn_probe.load_run(prev).name}, variant=f"from-report round {k}",
                      gamma=args.gamma, widths=args.mlp_widths)
            prev = nxt
            chain.append(nxt)
        print(f"feedback {args.dataset} seed {s} done", flush=True)


def analyse(args) -> None:
    """Print the numbers docs/findings.md quotes: sweep slopes, CV reductions, the policy comparison."""
    from bnn_probe.reports import stats
    from bnn_probe.reports.feedback import feedback_chains, feedback_verdicts
    from bnn_probe.reports.threshold_policies import cv_reduction, markdown, policy_comparison
    from bnn_probe.reports.thresholds import fan_in_law, layer_table
    root = Path(args.out)
    for ds_dir in sorted((root / "sweep").glob("*")):
        runs = [bnn_probe.load_run(p) for p in sorted(ds_dir.glob("W*_s*")) if (p / "meta.json").exists()]
        lt = layer_table(runs, window=0.5)
        fc2 = lt[lt["layer"] == "fc2.weight"].copy()
        fc2["seed"] = [bnn_probe.load_run(ds_dir / r).meta["config"]["seed"] for r in fc2["run"]]
        print(f"## sweep {ds_dir.name}: fc2 (fan-in W, fan-out 256), last 50 % of steps")
        print(fc2[["run", "fan_in", "abs_m_q50", "flip_ratio", "never_flipped"]].to_string(index=False))
        for q, col in (("median |m|", "abs_m_q50"), ("flip ratio", "flip_ratio")):
            s = stats.loglog_slope(fc2["fan_in"], fc2[col], fc2["seed"])
            print(f"slope of log {q} vs log fan-in: {s.slope:+.3f} [{s.interval[0]:+.3f}, {s.interval[1]:+.3f}] "
                  f"(n={s.n}, df={s.df}, intercept per seed)")
        law = fan_in_law(lt)
        print("all layers of the sweep runs (confounded by depth/fan-out):")
        print(law.slopes.to_string(index=False))
    for ds_dir in sorted((root / "feedback").glob("*")):
        seeds = sorted(p.name.rsplit("_s", 1)[1] for p in ds_dir.glob("from_report_s*") if (p / "meta.json").exists())
        before = [bnn_probe.load_run(ds_dir / f"global_s{s}") for s in seeds]
        after = [bnn_probe.load_run(ds_dir / f"from_report_s{s}") for s in seeds]
        print(f"## feedback {ds_dir.name}")
        print(cv_reduction(before, after).to_string(index=False))
        fed = [bnn_probe.load_run(p) for p in sorted(ds_dir.glob("from_report_r*_s*")) if (p / "meta.json").exists()]
        chains = feedback_chains(before + after + fed)  # every round, CV over the whole run
        print(chains.to_string(index=False))
        for v in feedback_verdicts(chains):
            print(f"{v.id}: {v.verdict}, {v.statistic_name} = {v.statistic:.3f} {v.interval}, n = {v.n} ({v.reason})")
        lt = layer_table(before + after)
        print(lt[["run", "layer", "fan_in", "flip_ratio", "threshold", "never_flipped"]].to_string(index=False))
        for r in before + after:
            print(r.name, "final val_accuracy", round(float(r.train["val_accuracy"].dropna().iloc[-1]), 4))
    for ds_dir in sorted((root / "policies").glob("*")):
        runs = [bnn_probe.load_run(p) for p in sorted(ds_dir.iterdir()) if (p / "meta.json").exists()]
        res = policy_comparison(runs)
        print(markdown(res))
        gl = [r for r in runs if r.meta["config"].get("variant", "").startswith("global") and
              "no-BN" not in r.meta["config"]["variant"]]
        print(fan_in_law(layer_table(gl)).slopes.to_string(index=False))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["policies", "sweep", "feedback", "analyse"])
    ap.add_argument("--dataset", default="digits", choices=list(MODELS))
    ap.add_argument("--out", default="runs/thresholds")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--tau", type=float, default=1e-6)
    ap.add_argument("--gamma", type=float, default=GAMMA, help="feedback: Bop's γ for every run")
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--rounds", type=int, default=1, help="feedback: report → from-report rounds")
    ap.add_argument("--method", default="ladder", choices=["ladder", "tail", "flow"],
                    help="feedback: recommend by the margin ladder (the report's), tail matching or the flow model")
    ap.add_argument("--mlp-widths", type=int, nargs="+", default=None,
                    help="feedback on digits: the MLP's hidden widths (default 2048 64 1024)")
    ap.add_argument("--seed-list", type=int, nargs="+", default=None,
                    help="feedback: train these seeds (e.g. 9 for tuning) instead of 0 … --seeds − 1")
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 2
    torch.set_num_threads(1)
    {"policies": policies, "sweep": sweep, "feedback": feedback, "analyse": analyse}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())

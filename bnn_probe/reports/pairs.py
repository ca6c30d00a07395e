"""Binary-trajectory comparison of two runs (``bnn-probe compare``) and the pair verdicts of a report.

The first differing step is found exactly from the per-(step, layer) ``sign_hash`` of both runs; Hamming distances
over time come from the ``snapshots`` (packed sign bits) at the steps both runs have one.
Pairs in a report are runs whose meta ``config`` has the same ``pair`` name (roles ``pair_role`` "a"/"b"), or whose
``tag`` contains ``theorem1`` / ``tau0`` (exactly two runs per tag kind).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import BnnProbeError
from . import stats
from .frames import config, frame, meta, run_name

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


@dataclass
class Comparison:
    run_a: str
    run_b: str
    first_difference_step: int | None
    first_difference_by_layer: dict
    n_compared: int  # (step, layer) entries with a hash in both runs
    n_equal: int
    n_steps_compared: int
    hamming: pd.DataFrame  # step, layer, n_weights, hamming, fraction
    max_hamming: int | None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "run_a": self.run_a, "run_b": self.run_b,
            "first_difference_step": self.first_difference_step,
            "first_difference_by_layer": self.first_difference_by_layer,
            "identical": self.first_difference_step is None and self.n_compared > 0,
            "n_compared": self.n_compared, "n_equal": self.n_equal, "n_steps_compared": self.n_steps_compared,
            "max_hamming": self.max_hamming,
            "hamming": [{"step": int(r.step), "layer": r.layer, "hamming": int(r.hamming),
                         "fraction": float(r.fraction)} for r in self.hamming.itertuples(index=False)],
            "notes": self.notes,
        }


def check_same_architecture(a, b) -> None:
    la, lb = frame(a, "layers"), frame(b, "layers")
    if la.empty or lb.empty:
        return
    cols = [c for c in ("layer", "n_weights") if c in la and c in lb]
    ka = la[cols].sort_values("layer").astype(str).values.tolist()
    kb = lb[cols].sort_values("layer").astype(str).values.tolist()
    if ka != kb:
        raise BnnProbeError(f"runs {run_name(a)} and {run_name(b)} have different architectures "
                            f"({len(ka)} vs {len(kb)} binary layers, or different layer names/sizes); compare needs "
                            "two runs of one architecture")


def _hamming(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    cols = ["step", "layer", "n_weights", "hamming", "fraction"]
    if a.empty or b.empty or "signs" not in a or "signs" not in b:
        return pd.DataFrame(columns=cols)
    m = a[["step", "layer", "n_weights", "signs"]].merge(b[["step", "layer", "signs"]], on=["step", "layer"],
                                                         suffixes=("_a", "_b"))
    if m.empty:
        return pd.DataFrame(columns=cols)
    ham = np.empty(len(m), dtype=np.int64)
    for i, (sa, sb) in enumerate(zip(m["signs_a"], m["signs_b"], strict=True)):  # one entry per snapshot, not per row
        xa = np.frombuffer(bytes(sa), dtype=np.uint8)
        xb = np.frombuffer(bytes(sb), dtype=np.uint8)
        n = min(xa.size, xb.size)
        ham[i] = int(_POPCOUNT[np.bitwise_xor(xa[:n], xb[:n])].sum()) + 8 * abs(xa.size - xb.size)
    out = m[["step", "layer", "n_weights"]].assign(hamming=ham)
    out["fraction"] = out["hamming"] / out["n_weights"].astype(float)
    return out.sort_values(["step", "layer"]).reset_index(drop=True)


def compare_runs(a, b) -> Comparison:
    """Binary-trajectory agreement of two runs of one architecture."""
    check_same_architecture(a, b)
    sa, sb = frame(a, "steps"), frame(b, "steps")
    notes = []
    first, by_layer, n_cmp, n_eq, n_steps = None, {}, 0, 0, 0
    if "sign_hash" in sa and "sign_hash" in sb:
        m = sa[["step", "layer", "sign_hash"]].merge(sb[["step", "layer", "sign_hash"]], on=["step", "layer"],
                                                     suffixes=("_a", "_b"))
        m = m[m["sign_hash_a"].notna() & m["sign_hash_b"].notna()]
        n_cmp = len(m)
        n_steps = int(m["step"].nunique())
        diff = m[m["sign_hash_a"] != m["sign_hash_b"]]
        n_eq = n_cmp - len(diff)
        if len(diff):
            first = int(diff["step"].min())
            by_layer = {str(k): int(v) for k, v in diff.groupby("layer")["step"].min().items()}
        empty = [getattr(r, "name", "?") for r, s in ((a, sa), (b, sb)) if s.empty]
        if empty:
            notes.append(f"no per-step rows in {' and '.join(empty)} (nothing logged, or its parts were unreadable "
                         "and skipped): nothing to compare")
        elif sa["step"].max() != sb["step"].max():
            notes.append(f"the runs have different lengths (last steps {sa['step'].max()} and {sb['step'].max()}); "
                         "compared over the common steps")
    else:
        notes.append("no sign_hash column in one of the runs: the first differing step is not known exactly")
    ham = _hamming(frame(a, "snapshots"), frame(b, "snapshots"))
    if len(ham):
        max_h = int(ham.groupby("step")["hamming"].sum().max())
        if first is None and max_h > 0:
            first_snap = int(ham.loc[ham["hamming"] > 0, "step"].min())
            notes.append(f"snapshots differ from step {first_snap} although the hashes agree")
    elif first is None and n_cmp > 0:
        max_h = 0
    else:
        max_h = None
    return Comparison(run_name(a), run_name(b), first, by_layer, n_cmp, n_eq, n_steps, ham, max_h, notes)


@dataclass
class Pair:
    name: str
    kind: str  # "theorem1", "tau0" or "pair"
    a: object
    b: object


def _kind(text: str) -> str:
    t = text.lower().replace("=", "").replace("_", "").replace("-", "")
    if "theorem1" in t or "thm1" in t:
        return "theorem1"
    if "tau0" in t:
        return "tau0"
    return "pair"


def find_pairs(runs) -> tuple[list[Pair], list[str]]:
    """Pairs marked in the runs' metadata (config pair/pair_role, or a tag containing theorem1 / tau0)."""
    groups: dict[str, list] = {}
    for run in runs:
        c = config(run)
        if {"theorem1", "bop_vs_latent"} & set(c.get("extra") or {}):
            continue  # experiments with their own report parts (reports/theorem1.py, reports/bop_vs_latent.py)
        if c.get("pair"):
            groups.setdefault(f"pair:{c['pair']}", []).append(run)
            continue
        tag = str(meta(run).get("tag") or "")
        kind = _kind(tag) if tag else "pair"
        if kind != "pair":
            groups.setdefault(f"tag:{kind}", []).append(run)
    pairs, notes = [], []
    for key, members in groups.items():
        name = key.split(":", 1)[1]
        if len(members) != 2:
            notes.append(f"pair {name!r} has {len(members)} runs, not 2; skipped")
            continue
        members = sorted(members, key=lambda r: (str(config(r).get("pair_role", "")), run_name(r)))
        pairs.append(Pair(name, _kind(name), members[0], members[1]))
    return pairs, notes


CLAIMS = {
    "theorem1": "Theorem 1: scaling the learning rate and the initial latent weights by one constant leaves the "
                "binary trajectory unchanged",
    "tau0": "Bop with τ = 0 equals latent SGD with decoupled decay: identical binary trajectories",
    "pair": "The two runs have identical binary trajectories",
}
VERDICT_IDS = {"tau0": "tau0.equivalence", "pair": "pairs.identical"}
METHODS = {
    "tau0": "exact comparison of the per-step sign hash of every layer (and of the sign snapshots) of the two runs; "
            "with γ = 2^-10 both forms round alike, so this checks that the implementation realises the τ = 0 "
            "identity (Helwegen et al. 2019, Sec. 4) — a deterministic check, not a statistical test, and no "
            "evidence for or against the inertia view; one differing step refutes it",
    "pair": "exact comparison of the per-step sign hash of every layer (and of the sign snapshots) of the two runs; "
            "one differing step refutes identity",
}


@dataclass
class PairResult:
    pair: Pair
    comparison: Comparison | None
    verdict: stats.Verdict | None  # None for a Theorem-1 pair (a code check, shown in the pairs table only)


def pair_verdicts(runs) -> tuple[list[PairResult], list[str]]:
    """Compare every marked pair. τ = 0 pairs and other pairs get a verdict (statistic: share of compared steps
    before the first differing one, 1 = identical throughout; no interval: the comparison is exact). A power-of-two
    Theorem-1 pair is a floating-point identity, i.e. a code check: compared and tabled, no verdict (Theorem 1 as an
    experiment: reports/theorem1.py)."""
    pairs, notes = find_pairs(runs)
    out = []
    for p in pairs:
        names = [run_name(p.a), run_name(p.b)]
        claim = f"{CLAIMS[p.kind]} (pair {p.name})"
        method = METHODS.get(p.kind, METHODS["pair"])
        vid = VERDICT_IDS.get(p.kind, "pairs.identical")
        stat_name = "share of steps before the first difference"
        try:
            c = compare_runs(p.a, p.b)
        except BnnProbeError as e:
            v = None if p.kind == "theorem1" else stats.Verdict(claim, stats.INCONCLUSIVE, None, None, 0, names,
                                                               stat_name, method, str(e), "pairs", vid)
            out.append(PairResult(p, None, v))
            continue
        if c.n_steps_compared == 0:
            verdict, why, stat = stats.INCONCLUSIVE, "no step with a sign hash in both runs", None
        elif c.first_difference_step is None:
            verdict, why, stat = stats.SUPPORTED, f"identical over {c.n_steps_compared} steps", 1.0
        else:
            steps = sorted(set(frame(p.a, "steps")["step"]) & set(frame(p.b, "steps")["step"]))
            before = sum(1 for t in steps if t < c.first_difference_step)
            verdict, why = stats.NOT_SUPPORTED, f"first difference at step {c.first_difference_step}"
            stat = before / max(len(steps), 1)
        v = None if p.kind == "theorem1" else stats.Verdict(claim, verdict, stat, None, c.n_steps_compared, names,
                                                           stat_name, method, why, "pairs", vid)
        out.append(PairResult(p, c, v))
    return out, notes

"""Which runs may be pooled: one run counted once, families never mixed, seeds counted.

* :func:`dedupe` — runs with the same training configuration (apart from bookkeeping: tag, pair names, study
  markers, probe cadences) *and* the same per-step sign hashes of every layer are one run (e.g. a study's
  ``inertia-bop-s0`` and ``hyperparams-bop-g1e-3-t1e-6-s0``); only the first is kept.
* :func:`pool_key` — the family a run may be pooled with: optimizer family (Bop, Bop2ndOrder, latent) and whether
  the model has batch norm; :func:`pool_label` names it (latent runs also by optimizer: latent-adam, latent-sgd).
* :func:`arm` — the run's configuration without its seed: runs of one arm are replicates.
* :func:`seed` — the run's seed (config), the unit of replication.
"""

from __future__ import annotations

import hashlib
import json
import re

import pandas as pd

from .frames import config, family, frame, run_name

BOOKKEEPING = ("tag", "pair", "pair_role", "extra",  # names and study markers
               "probe_every", "hist_every", "snapshot_every", "track",
               "quantile_every")  # what is recorded, not how it trains


def seed(run):
    """The run's seed from its config (None when unknown)."""
    return config(run).get("seed")


def pool_key(run) -> tuple[str, bool]:
    """(family, batch norm) — runs of different keys are never pooled."""
    bn = config(run).get("batch_norm", True)
    return family(run), bool(True if bn is None else bn)


def pool_label(run) -> str:
    """A readable pool name: the family (latent runs: their optimizer, e.g. ``latent-adam``), with
    " (no batch norm)" for models without it. Runs of different labels are never pooled."""
    fam, bn = pool_key(run)
    opt = config(run).get("optimizer")
    label = str(opt) if fam == "latent" and isinstance(opt, str) and opt.startswith("latent") else fam
    return label if bn else f"{label} (no batch norm)"


def arm(run) -> tuple[str, str]:
    """(key, label) of the run's configuration without its seed: runs of one arm are replicates (seeds) of one
    configuration. The label is the pool label and the run's name without its ``-s<seed>`` suffix."""
    c = {k: v for k, v in config(run).items() if k not in (*BOOKKEEPING, "seed")}
    key = json.dumps([pool_key(run), c], sort_keys=True, default=str)
    base, label = re.sub(r"-s\d+$", "", run_name(run)), pool_label(run)
    return key, base if base.startswith(label) else f"{label}: {base}"  # e.g. "latent-adam-clip", "bop: inertia-bop"


def trajectory_hash(run) -> str | None:
    """Digest of the (step, layer, sign_hash) sequence; None without sign hashes."""
    st = frame(run, "steps")
    if st.empty or "sign_hash" not in st or st["sign_hash"].isna().all():
        return None
    d = st[["step", "layer", "sign_hash"]].dropna().sort_values(["step", "layer"])
    h = pd.util.hash_pandas_object(d.astype({"layer": str}), index=False).to_numpy()
    return hashlib.sha256(h.tobytes()).hexdigest()


def run_key(run) -> tuple[str, str] | None:
    """(config without bookkeeping, trajectory hash), or None when the run has no sign hashes (never merged)."""
    th = trajectory_hash(run)
    if th is None:
        return None
    c = {k: v for k, v in config(run).items() if k not in BOOKKEEPING}
    return json.dumps(c, sort_keys=True, default=str), th


def dedupe(runs) -> tuple[list, list[str]]:
    """The runs with duplicates removed (first kept) and one note per removed run."""
    seen: dict[tuple[str, str], str] = {}
    out, notes = [], []
    for run in runs:
        k = run_key(run)
        if k is not None and k in seen:
            notes.append(f"{run_name(run)} is the same run as {seen[k]} (same configuration and binary trajectory): "
                         "counted once")
            continue
        if k is not None:
            seen[k] = run_name(run)
        out.append(run)
    return out, notes

"""Buffers per-step device results and moves them to the host in batches, then to the run log.

Per step the probe hands over a few device tensors (one int64 and one float64 vector for the steps table, and
fixed-size tensors for tracked weights and flip events). They stay on the device until :meth:`Recorder.drain`
(when ``buffer_steps`` steps are pending, or at a flush), which concatenates them and copies each kind to the host
once. :meth:`Recorder.flush` writes the host rows as new Parquet parts and TensorBoard events.

Example:
    >>> Recorder.INT_COLUMNS
    ('flips', 'c2i_diff', 'nonfinite_grads', 'sign_hash')
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..runlog.schema import HIST_EDGES, STEPS
from ..runlog.writer import RunWriter

__all__ = ["Recorder", "MISSING_INT"]

MISSING_INT = -(2**63)  # sentinel for a null int64 (e.g. sign_hash switched off)
HOST_COLUMNS = ("flip_ratio", "flip_ratio_running", "c2i", "c2i_corr", "gamma", "threshold", "lr", "sigma")
_INT_COLUMNS = ("flips", "c2i_diff", "nonfinite_grads", "sign_hash")


def _split_floats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[S, T, 2] → ([S, T] inertia, [S, T] step_size); [S, T] → (x, NaN)."""
    if x.ndim == 3:
        return x[:, :, 0], x[:, :, 1]
    return x, np.full(x.shape, math.nan)


class Recorder:
    """Device-side buffers → host DataFrames → Parquet parts + TensorBoard."""

    INT_COLUMNS = _INT_COLUMNS
    FLOAT_COLUMNS = tuple(c for c in STEPS if c not in ("step", "layer", *_INT_COLUMNS, *HOST_COLUMNS))

    def __init__(self, writer: RunWriter, layer_names: list[str], n_weights: list[int], families: list[str],
                 buffer_steps: int = 256, tb_every=None) -> None:
        self.writer = writer
        self.names = layer_names
        self.n = np.asarray(n_weights, dtype=np.int64)
        self.families = families
        self.L = len(layer_names)
        self.buffer_steps = max(1, int(buffer_steps))
        self.tb_every = tb_every
        self.fpos = {c: i for i, c in enumerate(self.FLOAT_COLUMNS)}
        self.run_sum = np.zeros(self.L)
        self.run_n = np.zeros(self.L, dtype=np.int64)
        self._steps: list[tuple[int, Tensor, Tensor, np.ndarray]] = []
        self._tracked: list[tuple[int, Tensor, Tensor]] = []
        self._events: list[tuple[int, Tensor, Tensor]] = []
        self._hists: list[tuple[int, int, str, Tensor, Tensor]] = []
        self._snaps: list[tuple[int, int, Tensor]] = []
        self._host: dict[str, list[pd.DataFrame]] = {t: [] for t in ("steps", "tracked", "events", "hists",
                                                                       "snapshots", "train")}
        self._train_rows: list[tuple[Any, Any, str, float]] = []
        self._pos_cache: dict[tuple, Tensor] = {}
        self.track_layout: list[tuple[int, np.ndarray]] = []  # per layer (offset, host indices)
        self.events_per_layer = 0

    # ---------------- per step (device) ----------------
    def float_positions(self, key: tuple, cols_per_layer: list[list[str]], device: torch.device) -> Tensor:
        """Flat positions in an [L, K_float] row of the given per-layer column lists (cached per key)."""
        if key not in self._pos_cache:
            k = len(self.FLOAT_COLUMNS)
            pos = [li * k + self.fpos[c] for li, cols in enumerate(cols_per_layer) for c in cols]
            self._pos_cache[key] = torch.tensor(pos, dtype=torch.int64, device=device)
        return self._pos_cache[key]

    def add_steps(self, step: int, ints: Tensor, floats: Tensor, hyper: np.ndarray) -> None:
        self._steps.append((step, ints, floats, hyper))

    def add_tracked(self, step: int, signs: Tensor, inertia: Tensor) -> None:
        """``inertia``: float64 [T, 2] = (inertia, step_size) per tracked weight ([T]: inertia only)."""
        self._tracked.append((step, signs, inertia))

    def add_events(self, step: int, ints: Tensor, inertia: Tensor) -> None:
        """``inertia``: float64 [L·E, 2] = (inertia_before, step_size) per slot ([L·E]: inertia_before only)."""
        self._events.append((step, ints, inertia))

    def add_hist(self, step: int, layer: int, quantity: str, counts: Tensor, stats: Tensor) -> None:
        self._hists.append((step, layer, quantity, counts, stats))

    def add_snapshot(self, step: int, layer: int, bits: Tensor) -> None:
        self._snaps.append((step, layer, bits))

    def add_train(self, step: int | None, epoch: int | None, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self._train_rows.append((step, epoch, k, float(v)))
        tb = self.writer.tb
        if tb is not None:
            x = step if step is not None else epoch
            for k, v in scalars.items():
                tb.add_scalar(k, float(v), x if x is not None else 0)

    def pending(self) -> int:
        return max(len(self._steps), len(self._tracked), len(self._events))

    # ---------------- device → host ----------------
    def drain(self) -> None:
        """Copy every pending device result to the host (one copy per kind) and turn it into rows."""
        if self._steps:
            self._drain_steps()
        if self._tracked:
            self._drain_tracked()
        if self._events:
            self._drain_events()
        if self._hists:
            self._drain_hists()
        if self._snaps:
            self._drain_snaps()

    def _drain_steps(self) -> None:
        batch, self._steps = self._steps, []
        S, L = len(batch), self.L
        steps = np.array([b[0] for b in batch], dtype=np.int64)
        ints = torch.stack([b[1] for b in batch]).cpu().numpy().reshape(S, L, len(self.INT_COLUMNS))
        floats = torch.stack([b[2] for b in batch]).cpu().numpy().reshape(S, L, len(self.FLOAT_COLUMNS))
        hyper = np.stack([b[3] for b in batch])  # [S, L, 4]
        flips = ints[:, :, 0]
        ratio = flips / self.n[None, :]
        csum = np.cumsum(ratio, axis=0) + self.run_sum[None, :]
        cnt = np.arange(1, S + 1)[:, None] + self.run_n[None, :]
        running = csum / cnt
        self.run_sum = csum[-1].copy()
        self.run_n = cnt[-1].copy()
        cols: dict[str, Any] = {
            "step": np.repeat(steps, L),
            "layer": pd.Categorical(np.tile(np.arange(L), S)).rename_categories(self.names)
            if L else np.array([], dtype=object),
            "flips": flips.reshape(-1),
            "flip_ratio": ratio.reshape(-1),
            "flip_ratio_running": running.reshape(-1),
            "c2i": (1.0 - ints[:, :, 1] / self.n[None, :]).reshape(-1),
            "c2i_corr": (1.0 - 2.0 * ints[:, :, 1] / self.n[None, :]).reshape(-1),  # 2·c2i − 1
            "c2i_diff": ints[:, :, 1].reshape(-1),
            "nonfinite_grads": ints[:, :, 2].reshape(-1),
        }
        h = ints[:, :, 3].reshape(-1)
        cols["sign_hash"] = pd.array(np.where(h == MISSING_INT, 0, h), dtype="Int64")
        cols["sign_hash"][h == MISSING_INT] = pd.NA
        for j, c in enumerate(("gamma", "threshold", "lr", "sigma")):
            cols[c] = hyper[:, :, j].reshape(-1)
        for j, c in enumerate(self.FLOAT_COLUMNS):
            cols[c] = floats[:, :, j].reshape(-1)
        df = pd.DataFrame(cols)
        df["layer"] = df["layer"].astype(str)
        self._host["steps"].append(df)
        self._tb_steps(steps, ratio, cols)

    def _tb_steps(self, steps: np.ndarray, ratio: np.ndarray, cols: dict[str, Any]) -> None:
        tb = self.writer.tb
        if tb is None:
            return
        L = self.L
        c2i = cols["c2i"].reshape(-1, L)
        extra = {fam: ("abs_m_q50" if fam != "latent" else "abs_w_q50") for fam in set(self.families)}
        for i, s in enumerate(steps):
            if self.tb_every is not None and not self.tb_every(int(s)):
                continue
            for li, name in enumerate(self.names):
                tb.add_scalar(f"flip_ratio/{name}", ratio[i, li], int(s))
                tb.add_scalar(f"c2i/{name}", c2i[i, li], int(s))
                q = extra[self.families[li]]
                v = cols[q][i * L + li]
                if v == v:
                    tb.add_scalar(f"{q}/{name}", v, int(s))
                tau = cols["threshold"][i * L + li]  # the layer's τ in force (Bop families; NaN for latent)
                if tau == tau:
                    tb.add_scalar(f"threshold/{name}", tau, int(s))

    def _drain_tracked(self) -> None:
        batch, self._tracked = self._tracked, []
        steps = np.array([b[0] for b in batch], dtype=np.int64)
        signs = torch.stack([b[1] for b in batch]).cpu().numpy()
        if signs.dtype == np.bool_:  # the probe hands over sign(w) ≥ 0 as bool; written as ±1
            signs = np.where(signs, 1, -1).astype(np.int8)
        inertia, step_size = _split_floats(torch.stack([b[2] for b in batch]).cpu().numpy())
        S, T = signs.shape
        layer = np.concatenate([np.full(len(idx), li) for li, (_, idx) in enumerate(self.track_layout)])
        index = np.concatenate([idx for _, idx in self.track_layout])
        df = pd.DataFrame({
            "step": np.repeat(steps, T), "layer": np.asarray(self.names, dtype=object)[np.tile(layer, S)],
            "index": np.tile(index, S), "sign": signs.reshape(-1).astype(np.int8), "inertia": inertia.reshape(-1),
            "step_size": step_size.reshape(-1)})
        self._host["tracked"].append(df)

    def _drain_events(self) -> None:
        batch, self._events = self._events, []
        steps = np.array([b[0] for b in batch], dtype=np.int64)
        ints = torch.stack([b[1] for b in batch]).cpu().numpy()  # [S, L*E, 2]
        inertia, step_size = _split_floats(torch.stack([b[2] for b in batch]).cpu().numpy())  # [S, L*E] each
        S, LE, _ = ints.shape
        e = self.events_per_layer
        layer = np.tile(np.repeat(np.arange(self.L), e), S)
        idx = ints[:, :, 0].reshape(-1)
        keep = idx >= 0
        since = ints[:, :, 1].reshape(-1)
        df = pd.DataFrame({
            "step": np.repeat(steps, LE)[keep], "layer": np.asarray(self.names, dtype=object)[layer[keep]],
            "index": idx[keep], "inertia_before": inertia.reshape(-1)[keep],
            "steps_since_last_flip": pd.array(np.where(since[keep] < 0, 0, since[keep]), dtype="Int64"),
            "step_size": step_size.reshape(-1)[keep]})
        df.loc[since[keep] < 0, "steps_since_last_flip"] = pd.NA
        df = df.drop_duplicates(["step", "layer", "index"])
        self._host["events"].append(df)

    def _drain_hists(self) -> None:
        batch, self._hists = self._hists, []
        counts = torch.cat([b[3] for b in batch]).cpu().numpy()
        stats = torch.stack([b[4] for b in batch]).cpu().numpy()
        rows = []
        off = 0
        tb = self.writer.tb
        for k, (step, li, q, c, _) in enumerate(batch):
            cnt = counts[off:off + c.numel()]
            off += c.numel()
            edges = HIST_EDGES[q]
            left = np.concatenate([[-math.inf], edges])
            right = np.concatenate([edges, [math.inf]])
            nz = np.nonzero(cnt)[0]
            rows.append(pd.DataFrame({"step": step, "layer": self.names[li], "quantity": q, "bin": nz,
                                      "left": left[nz], "right": right[nz], "count": cnt[nz].astype(np.int64)}))
            if tb is not None and len(nz):
                mn, mx, sm, sq = (float(x) for x in stats[k])
                lim = right[nz].copy()
                if math.isinf(lim[-1]):
                    lim[-1] = max(mx, left[nz[-1]])
                tb.add_histogram_raw(f"{q}/{self.names[li]}", min=mn, max=mx, num=int(cnt.sum()), sum=sm,
                                     sum_squares=sq, bucket_limits=lim.tolist(), bucket_counts=cnt[nz].tolist(),
                                     global_step=int(step))
        self._host["hists"].append(pd.concat(rows, ignore_index=True))

    def _drain_snaps(self) -> None:
        batch, self._snaps = self._snaps, []
        rows = [{"step": s, "layer": self.names[li], "n_weights": int(b.numel()),
                 "signs": np.packbits(b.cpu().numpy(), bitorder="big").tobytes()} for s, li, b in batch]
        self._host["snapshots"].append(pd.DataFrame(rows))

    # ---------------- host → disk ----------------
    def flush(self) -> None:
        """Drain and write every pending row as new parts."""
        self.drain()
        if self._train_rows:
            rows, self._train_rows = self._train_rows, []
            self._host["train"].append(pd.DataFrame({
                "step": pd.array([r[0] for r in rows], dtype="Int64"),
                "epoch": pd.array([r[1] for r in rows], dtype="Int64"),
                "name": [r[2] for r in rows], "value": np.array([r[3] for r in rows], dtype=np.float64)}))
        for table, frames in self._host.items():
            if frames:
                self._host[table] = []
                self.writer.append(table, pd.concat(frames, ignore_index=True))
        self.writer.flush_tb()

    def write_weight_flips(self, step: int, counts: list[Tensor]) -> None:
        """weight_flips.parquet: for each layer and k, the number of weights that flipped exactly k times."""
        if not counts:
            return
        bins = [torch.bincount(c.to(torch.int64)) for c in counts]
        sizes = [b.numel() for b in bins]
        flat = torch.cat(bins).cpu().numpy()
        rows, off = [], 0
        for li, sz in enumerate(sizes):
            b = flat[off:off + sz]
            off += sz
            nz = np.nonzero(b)[0]
            rows.append(pd.DataFrame({"step": step, "layer": self.names[li], "flips_per_weight": nz,
                                      "n": b[nz].astype(np.int64)}))
        self.writer.write_table("weight_flips", pd.concat(rows, ignore_index=True))

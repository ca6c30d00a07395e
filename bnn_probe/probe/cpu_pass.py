"""ctypes bindings of the one-pass CPU measurement (``bnn_probe/probe/_pass.c``, built by ``pip install``).

The C functions read the binary weights, m and the gradients in place through per-layer pointer tables and update a
one-byte state per weight (bit 0 the sign b(w) before the step / at the last measurement, bit 1 b(w_0), bit 2
|m| > τ at the last measurement, bit 3 flipped in the last step), the flip counters and the sign hash; they return
every per-layer count of a step in one call. :func:`load` returns None when the extension was not built (no C
compiler at install time): the probe then measures CPU groups with the pure-torch path of probe/fused.py, which
gives the same values more slowly, and says so once (``bnn_probe.probe.cpu_pass.available()``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import cache

import numpy as np

__all__ = ["NC_BOP", "NC_LAT", "S_SIGN", "S_SIGN0", "S_ABOVE", "S_FLIP", "Plan", "available", "hist_lut", "load"]

NC_BOP, NC_LAT = 13, 4  # count columns per layer (see _pass.c)
S_SIGN, S_SIGN0, S_ABOVE, S_FLIP = 1, 2, 4, 8  # bits of the per-weight state byte
_ABI = 15

_P = ctypes.c_void_p
_I = ctypes.c_int64


class Plan(ctypes.Structure):
    """The C ``bnnp_plan`` (_pass.c): every array a pass reads or writes, by address. Array fields are set with
    :meth:`set`, which keeps a reference so the memory stays alive as long as the plan."""

    _fields_ = [("L", _I), ("K", _I), ("lens", _P), ("offs", _P), ("wp", _P), ("mp", _P), ("gp", _P), ("sgn", _P),
                ("tau", _P), ("thr", _P), ("clip", _P), ("tau_valid", _P), ("clip_valid", _P), ("state", _P),
                ("m_out", _P), ("wm_out", _P), ("count", _P), ("last", _P), ("mix", _P), ("hash", _P), ("fidx", _P),
                ("flast", _P), ("counts", _P), ("sum_abs", _P), ("ks", _P), ("qidx", _P), ("samp", _P),
                ("nf", _I), ("t", ctypes.c_int32),
                ("cur", _I), ("nev", _I), ("ntr", _I), ("Q", _I), ("Qm", _I), ("nfloat", _I), ("hash_on", _I),
                ("mbuf", _P * 2), ("wmbuf", _P * 2), ("u", _P), ("tau_l", _P), ("tau_t", _P), ("ev_i", _P),
                ("ev_safe", _P), ("ev_f", _P), ("tsel", _P), ("tr_sign", _P), ("tr_out", _P), ("rows_i", _P),
                ("rows_f", _P), ("qpos", _P), ("mpos", _P), ("qfrac", _P), ("mfrac", _P), ("prev", _P), ("nbop", _I),
                ("hp", _P), ("nonfin", _P), ("fwm", _P), ("fmo", _P), ("tmprev", _P), ("fhist", _P), ("fcap", _I),
                ("fover", _P), ("trk_mode", _I)]

    def set(self, **arrays: np.ndarray | None) -> None:
        refs = self.__dict__.setdefault("_refs", {})
        for name, a in arrays.items():
            if a is not None and not a.flags.c_contiguous:
                raise ValueError(f"plan field {name}: array must be C-contiguous")
            refs[name] = a
            setattr(self, name, None if a is None else a.ctypes.data)


_PP = ctypes.POINTER(Plan)
_SIGNATURES = {
    "bnnp_pre": (_I, [_PP, _P]),
    "bnnp_bop_post": (_I, [_PP]),
    "bnnp_lat_post": (_I, [_PP]),
    "bnnp_interp": (None, [_I, _I, _P, _I, _P, _P, _I, _P]),
    "bnnp_events": (None, [_PP, _I, _P, _P, _P, _P, _P, _P, _P, _P]),
    "bnnp_hist": (None, [_PP, ctypes.c_int32, _P, _P, _I, _P, _P, _P]),
    "bnnp_tracked": (None, [_PP, _I, _P, _P, _P, _P, _P, _P, _P]),
    "bnnp_bop_step": (_I, [_PP, _I]),
    "bnnp_bop_rows": (None, [_PP]),
    "bnnp_lat_step": (_I, [_PP, _I]),
    "bnnp_lat_rows": (None, [_PP]),
    "bnnp_bop_update": (None, [_I, _P, _P, _P, _P, _P, _P]),
    "bnnp_bop_fused": (_I, [_PP]),
    "bnnp_bop_tail": (None, [_PP, _I]),
    "bnnp_check": (None, [_P, _P, _P, _I, _P]),
    "bnnp_count_ne": (_I, [_P, _P, _I]),
}


class _Kernels:
    """The C functions of one float type (``f32`` / ``f64``)."""

    def __init__(self, lib: ctypes.CDLL, sfx: str) -> None:
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(lib, f"{name}_{sfx}")
            fn.restype, fn.argtypes = res, args
            setattr(self, name[5:], fn)


class _TBKernels:
    """The TensorBoard record functions (_tfrecord.h; bnn_probe/runlog/tbevents.py): ``scalars`` (serialized
    scalar Events), ``frame`` (TFRecord framing), ``crc`` (masked CRC-32C of segments)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        for attr, name, res, args in (("scalars", "bnnp_tb_scalars", _I, [_I, _I] + [_P] * 8),
                                      ("frame", "bnnp_tf_frame", None, [_P, _P, _I, _P]),
                                      ("crc", "bnnp_crc32c_masked", None, [_P, _P, _P, _I, _P])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
            setattr(self, attr, fn)


@cache
def load() -> dict[np.dtype, _Kernels] | None:
    """{numpy float dtype: kernels}, or None when the extension is missing, disabled (environment variable
    ``BNN_PROBE_NO_KERNEL=1``) or of another ABI version."""
    if os.environ.get("BNN_PROBE_NO_KERNEL"):
        return None
    spec = importlib.util.find_spec("bnn_probe.probe._pass")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
        lib.bnnp_abi_version.restype = ctypes.c_int64
        lib.bnnp_set_simd.argtypes = [ctypes.c_int]
        if lib.bnnp_abi_version() != _ABI:
            return None
        ks = {np.dtype(np.float32): _Kernels(lib, "f32"), np.dtype(np.float64): _Kernels(lib, "f64")}
        ks["set_simd"] = lib.bnnp_set_simd  # -1: detect (default), 0: portable loops only (tests)
        ks["tb"] = _TBKernels(lib)
        return ks
    except (OSError, AttributeError):
        return None


def available() -> bool:
    """True when the compiled one-pass CPU measurement is installed and loadable."""
    return load() is not None


def hist_lut(edges: np.ndarray) -> np.ndarray:
    """uint8 [2^16]: for each cell of doubles sharing their top 16 bits, the number of ``edges`` ≤ the cell's smallest
    value when the cell holds at most one edge (then one comparison finds the bin), else 255 (binary search).
    Cells of NaN/inf and cells crossed by two or more edges get 255."""
    keys = np.arange(1 << 16, dtype=np.uint64) << np.uint64(48)
    low = keys | np.uint64((1 << 48) - 1)
    neg = keys >= np.uint64(1 << 63)
    lo_bits = np.where(neg, low, keys)  # the smallest double of the cell
    hi_bits = np.where(neg, keys, low)
    cmin, cmax = lo_bits.view(np.float64), hi_bits.view(np.float64)
    e = np.asarray(edges, dtype=np.float64)
    nmin, nmax = np.searchsorted(e, cmin, side="right"), np.searchsorted(e, cmax, side="right")
    ok = np.isfinite(cmin) & np.isfinite(cmax) & (nmax - nmin <= 1) & (nmin < 255)
    return np.where(ok, nmin, 255).astype(np.uint8)

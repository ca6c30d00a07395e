"""Datasets for the reference runs: ``digits`` (shipped with scikit-learn), ``mnist1d`` (generated locally) and
``cifar10`` (read from a folder the user names). Nothing is downloaded.

Every loader returns a :class:`Dataset`: the whole train and validation split as tensors (float32 inputs, int64
labels), already normalised, which :meth:`Dataset.to` moves to the training device once; :meth:`Dataset.batches`
then slices mini-batches on the device with a seeded permutation per epoch (no DataLoader, no host↔device copies).

* ``digits``: scikit-learn's 1,797 handwritten digits (8×8, 10 classes). A fixed train/validation split (80 / 20 %,
  stratified, split seed 0 independent of the training seed), each pixel standardised with the training split's mean
  and standard deviation (constant pixels get std 1). Shape ``(64,)`` (``layout="flat"``) or ``(1, 8, 8)``
  (``layout="image"``).
* ``mnist1d``: MNIST-1D (Greydanus 2020) from ``mnist1d.data.make_dataset(get_dataset_args())``: 4,000 training and
  1,000 validation sequences of length 40, already centred and scaled by the package. Generated in memory (about a
  second), never downloaded, nothing cached on disk. Shape ``(40,)``.
* ``cifar10``: the CIFAR-10 "python version" folder (``data_batch_1`` … ``data_batch_5``, ``test_batch``: pickled
  dicts with ``b"data"``, uint8 of shape (N, 3072), and ``b"labels"``); the test batch is the validation split.
  The files are untrusted: they are read with :class:`CifarUnpickler`, which builds only the dicts, lists, bytes,
  strings, numbers and integer numpy arrays of that format and refuses anything else (a crafted file is a one-line
  error, never code that runs; docs/trust.md).
  Per-channel normalisation with the training split's mean and std. Shape ``(3, 32, 32)`` (``(3072,)`` flat).

Example:
    >>> ds = load_dataset("digits")
    >>> ds.in_shape, ds.num_classes, len(ds.x_train), len(ds.x_val)
    ((64,), 10, 1437, 360)
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import BnnProbeError

__all__ = ["Dataset", "DATASETS", "load_dataset", "load_digits", "load_mnist1d", "load_cifar10", "CIFAR10_FILES",
           "CifarUnpickler"]

DATASETS: tuple[str, ...] = ("digits", "mnist1d", "cifar10")
CIFAR10_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """A train/validation split held as tensors.

    Attributes:
        name: dataset name.
        x_train, y_train, x_val, y_val: inputs (float32, normalised) and labels (int64).
        num_classes: number of classes.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one input (without the batch dimension)."""
        return tuple(self.x_train.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: str | torch.device) -> Dataset:
        """The same data on ``device`` (one copy; batches are then sliced there)."""
        device = torch.device(device)
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_val=self.x_val.to(device), y_val=self.y_val.to(device))

    def steps_per_epoch(self, batch_size: int) -> int:
        """Number of batches :meth:`batches` yields per epoch (a trailing batch of one sample is dropped)."""
        n = len(self.x_train)
        full, rest = divmod(n, batch_size)
        return full + (1 if rest >= 2 else 0)

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                shuffle: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of training batches, sliced on the data's device.

        The permutation is drawn on the CPU from ``generator`` (so it is the same on every device) and moved to the
        device once per epoch. The last batch may be smaller; a trailing batch of a single sample is dropped (batch
        norm cannot train on it).
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        n = len(self.x_train)
        if shuffle:
            order = torch.randperm(n, generator=generator).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                break
            yield self.x_train.index_select(0, idx), self.y_train.index_select(0, idx)


def _standardise(train: np.ndarray, val: np.ndarray, axis: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Standardise with the training split's mean/std over ``axis`` (std 0 → 1)."""
    mean = train.mean(axis=axis, keepdims=True)
    std = train.std(axis=axis, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (val - mean) / std


def _make(name: str, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray,
          num_classes: int = 10) -> Dataset:
    return Dataset(name=name,
                   x_train=torch.as_tensor(np.ascontiguousarray(x_tr, dtype=np.float32)),
                   y_train=torch.as_tensor(np.asarray(y_tr, dtype=np.int64)),
                   x_val=torch.as_tensor(np.ascontiguousarray(x_va, dtype=np.float32)),
                   y_val=torch.as_tensor(np.asarray(y_va, dtype=np.int64)),
                   num_classes=num_classes)


def load_digits(layout: str = "flat") -> Dataset:
    """scikit-learn's digits, fixed stratified 80/20 split (seed 0), per-pixel standardisation."""
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_digits()
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.int64)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SPLIT_SEED,
                                              stratify=y)
    x_tr, x_va = _standardise(x_tr, x_va, axis=(0,))
    if layout == "image":
        x_tr, x_va = x_tr.reshape(-1, 1, 8, 8), x_va.reshape(-1, 1, 8, 8)
    return _make("digits", x_tr, y_tr, x_va, y_va)


def load_mnist1d(layout: str = "flat") -> Dataset:
    """MNIST-1D generated in memory with the package's default arguments (seed 42): 4,000 train, 1,000 validation.

    ``make_dataset`` seeds NumPy's global RNG; its state is restored afterwards so callers are not affected.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BnnProbeError("the mnist1d dataset needs the 'mnist1d' package: pip install mnist1d "
                            "(or pip install 'bnn-probe[mnist1d]')") from e
    state = np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    x_tr, x_va = np.asarray(d["x"]), np.asarray(d["x_test"])
    if layout == "image":
        x_tr, x_va = x_tr[:, None, :], x_va[:, None, :]
    return _make("mnist1d", x_tr, d["y"], x_va, d["y_test"])


def _cifar_error(folder: Path, problem: str) -> BnnProbeError:
    return BnnProbeError(f"{problem}: --data-dir must be a CIFAR-10 python-version folder holding "
                         f"{', '.join(CIFAR10_FILES)} (pickled dicts with b'data' uint8 (N, 3072) and b'labels'); "
                         f"got {folder}")


_INT_DTYPES = frozenset({"u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8"})


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy arrays are allowed")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _safe_dtype(name: Any, align: bool = False, copy: bool = True) -> np.dtype:
    if not isinstance(name, str) or name not in _INT_DTYPES:
        raise pickle.UnpicklingError(f"dtype {name!r:.20} is not allowed (integer arrays only)")
    return np.dtype(name, bool(align), bool(copy))


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.str[1:] not in _INT_DTYPES or order not in ("C", "F"):
        raise pickle.UnpicklingError("only integer arrays are allowed")
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order)


def _safe_encode(text: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("only latin1-encoded byte strings are allowed")
    return text.encode("latin1")


class CifarUnpickler(pickle.Unpickler):
    """The only unpickler bnn-probe uses: CIFAR-10's batches are untrusted files (docs/trust.md), and a plain
    ``pickle.load`` runs whatever code a crafted file names. This one builds dicts, lists, tuples, strings, bytes,
    numbers and integer numpy arrays (``numpy.ndarray`` of dtype u1…i8, from ``_reconstruct``/``dtype``, or
    ``_frombuffer`` for pickle protocol 5; bytes written by Python 3's protocol 2 via ``_codecs.encode(..., "latin1")``)
    and refuses every other global with
    ``pickle.UnpicklingError``, before calling anything."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
        ("_codecs", "encode"): _safe_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        fn = self._ALLOWED.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return fn


def _read_cifar_batch(path: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            d = CifarUnpickler(fh, encoding="bytes").load()
        if not isinstance(d, dict):
            raise TypeError("not a dict")
        data = np.asarray(d[b"data"] if b"data" in d else d["data"])
        labels = np.asarray(d[b"labels"] if b"labels" in d else d["labels"], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any unreadable or unsafe file gets the same one-line message
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise _cifar_error(folder, f"cannot read {path.name} ({type(e).__name__}{': ' + why if why else ''})") \
            from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or len(labels) != len(data):
        raise _cifar_error(folder, f"{path.name} is malformed (data {data.dtype}{tuple(data.shape)}, "
                                   f"{len(labels)} labels)")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise _cifar_error(folder, f"{path.name} has labels outside 0..9")
    return data, labels


def load_cifar10(data_dir: str | Path | None, layout: str = "image") -> Dataset:
    """CIFAR-10 from its python-pickle batches in ``data_dir`` (or its ``cifar-10-batches-py`` subfolder)."""
    if data_dir is None:
        raise _cifar_error(Path("(none)"), "the cifar10 dataset needs --data-dir")
    folder = Path(data_dir).expanduser()
    if (folder / "cifar-10-batches-py").is_dir() and not (folder / "test_batch").exists():
        folder = folder / "cifar-10-batches-py"
    if not folder.is_dir():
        raise _cifar_error(folder, "folder not found")
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        raise _cifar_error(folder, f"missing {', '.join(missing)}")
    parts = [_read_cifar_batch(folder / f, folder) for f in CIFAR10_FILES[:-1]]
    x_tr = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    y_tr = np.concatenate([p[1] for p in parts])
    x_va, y_va = _read_cifar_batch(folder / CIFAR10_FILES[-1], folder)
    x_va = x_va.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    x_tr, x_va = _standardise(x_tr, x_va, axis=(0, 2, 3))
    if layout == "flat":
        x_tr, x_va = x_tr.reshape(len(x_tr), -1), x_va.reshape(len(x_va), -1)
    return _make("cifar10", x_tr, y_tr, x_va, y_va)


def load_dataset(name: str, data_dir: str | Path | None = None, layout: str = "flat") -> Dataset:
    """Load a dataset by name (``digits``, ``mnist1d``, ``cifar10``) on the CPU.

    Args:
        name: dataset name.
        data_dir: the CIFAR-10 folder (only ``cifar10`` reads it).
        layout: ``"flat"`` (one vector per sample, for the MLP and the 1-D conv net) or ``"image"``
            (channels first, for BinaryNet; ``(1, 40)`` for MNIST-1D).
    """
    if layout not in ("flat", "image"):
        raise ValueError(f"unknown layout {layout!r}: choose flat or image")
    if name == "digits":
        return load_digits(layout)
    if name == "mnist1d":
        return load_mnist1d(layout)
    if name == "cifar10":
        return load_cifar10(data_dir, layout)
    raise BnnProbeError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")

"""Datasets: shapes, normalisation, fixed split, seeded batches, CIFAR-10 folder reading and its errors."""

import pickle

import numpy as np
import pytest
import torch

from bnn_probe.data import CIFAR10_FILES, load_dataset
from bnn_probe.errors import BnnProbeError


def test_digits_shapes_split_and_standardisation():
    ds = load_dataset("digits")
    assert ds.in_shape == (64,) and ds.num_classes == 10
    assert len(ds.x_train) == 1437 and len(ds.x_val) == 360
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    mean, std = ds.x_train.mean(0), ds.x_train.std(0, unbiased=False)
    assert mean.abs().max() < 1e-5
    varying = std > 0
    assert torch.allclose(std[varying], torch.ones_like(std[varying]), atol=1e-4)
    assert set(ds.y_val.tolist()) == set(range(10))
    again = load_dataset("digits", layout="image")
    assert again.in_shape == (1, 8, 8)
    assert torch.equal(again.x_train.reshape(len(again.x_train), -1), ds.x_train)  # fixed split
    assert torch.equal(again.y_val, ds.y_val)


def test_batches_are_seeded_and_cover_the_epoch():
    ds = load_dataset("digits")
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    b1 = list(ds.batches(100, g1))
    b2 = list(ds.batches(100, g2))
    assert len(b1) == ds.steps_per_epoch(100) == 15
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(b1, b2, strict=True))
    ys = torch.cat([y for _, y in b1])
    assert torch.equal(ys.sort().values, ds.y_train.sort().values)  # every sample exactly once
    b3 = list(ds.batches(100, g1))  # next epoch: another permutation
    assert not torch.equal(b3[0][1], b1[0][1])


def test_trailing_single_sample_batch_is_dropped():
    ds = load_dataset("digits")  # 1437 = 2 * 718 + 1
    assert ds.steps_per_epoch(718) == 2
    assert [len(y) for _, y in ds.batches(718)] == [718, 718]


def test_mnist1d_generated_locally_without_touching_numpy_rng():
    pytest.importorskip("mnist1d")
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    ds = load_dataset("mnist1d")
    assert np.random.rand() == expected
    assert ds.in_shape == (40,) and len(ds.x_train) == 4000 and len(ds.x_val) == 1000
    assert ds.num_classes == 10 and set(ds.y_train.tolist()) == set(range(10))
    assert load_dataset("mnist1d", layout="image").in_shape == (1, 40)


def _write_cifar(folder, n=6, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in CIFAR10_FILES:
        d = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, size=n).tolist(), b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as fh:
            pickle.dump(d, fh)


def test_cifar10_reads_the_pickle_batch_format(tmp_path):
    _write_cifar(tmp_path / "cifar")
    ds = load_dataset("cifar10", data_dir=tmp_path / "cifar", layout="image")
    assert ds.in_shape == (3, 32, 32) and len(ds.x_train) == 30 and len(ds.x_val) == 6
    per_channel = ds.x_train.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(1).abs().max() < 1e-4
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-3)
    with open(tmp_path / "cifar" / "data_batch_1", "rb") as fh:
        first = pickle.load(fh)
    assert ds.y_train[:6].tolist() == first[b"labels"]
    # The parent folder of the standard "cifar-10-batches-py" is accepted too; flat layout for the MLP.
    _write_cifar(tmp_path / "parent" / "cifar-10-batches-py")
    assert load_dataset("cifar10", data_dir=tmp_path / "parent").in_shape == (3072,)


def test_cifar10_missing_or_malformed_folder_is_one_line_error(tmp_path):
    with pytest.raises(BnnProbeError, match="data_batch_1.*test_batch") as e:
        load_dataset("cifar10", data_dir=tmp_path / "nope")
    assert "\n" not in str(e.value)
    with pytest.raises(BnnProbeError, match="needs --data-dir"):
        load_dataset("cifar10")
    _write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(BnnProbeError, match="missing data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(BnnProbeError, match="cannot read data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path / "c")
    with open(tmp_path / "c" / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(BnnProbeError, match="data_batch_3 is malformed"):
        load_dataset("cifar10", data_dir=tmp_path / "c")


def test_unknown_dataset():
    with pytest.raises(BnnProbeError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_to_device_keeps_data():
    ds = load_dataset("digits").to("cpu")
    assert ds.device.type == "cpu"

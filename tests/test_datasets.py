"""Tests for curvkit.datasets: digits, MNIST-1D, local IDX MNIST/Fashion-MNIST, subsets."""

from __future__ import annotations

import gzip
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from curvkit.datasets import (
    IDX_FILES,
    MNIST_MEAN,
    MNIST_STD,
    Dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    load_mnist1d,
    read_idx,
    subset,
)

# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def test_digits_shapes_and_dtypes(digits: Dataset) -> None:
    assert digits.x_train.shape == (1438, 64)
    assert digits.x_test.shape == (359, 64)
    assert digits.y_train.shape == (1438,)
    assert digits.x_train.dtype == torch.float32
    assert digits.y_train.dtype == torch.int64
    assert digits.num_classes == 10
    assert digits.name == "digits"
    assert set(digits.y_train.tolist()) == set(range(10))
    r = repr(digits)
    assert "train=1438x64" in r and "test=359x64" in r and "digits" in r


def test_digits_standardised_with_train_statistics(digits: Dataset) -> None:
    x = digits.x_train.double()
    std = x.std(0, unbiased=False)
    varying = std > 0
    assert varying.sum() > 50
    torch.testing.assert_close(x.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        std[varying], torch.ones(int(varying.sum()), dtype=torch.float64), atol=1e-5, rtol=0
    )
    # Pixels constant on the training set are centred (to 0), not divided by 0.
    assert torch.isfinite(digits.x_train).all() and torch.isfinite(digits.x_test).all()
    assert (x[:, ~varying] == 0).all()


def test_digits_split_is_deterministic_and_partitions_the_data(digits: Dataset) -> None:
    again = load_digits()
    assert torch.equal(again.x_train, digits.x_train)
    assert torch.equal(again.y_test, digits.y_test)
    other = load_digits(seed=1)
    assert not torch.equal(other.y_train, digits.y_train)

    raw = load_digits(standardize=False)
    assert raw.x_train.min() >= 0 and raw.x_train.max() <= 16
    rows = {tuple(r) for r in torch.cat([raw.x_train, raw.x_test]).int().tolist()}
    from sklearn.datasets import load_digits as sk_load_digits

    all_rows = {tuple(r) for r in sk_load_digits().data.astype(int).tolist()}
    assert rows == all_rows  # train + test cover the whole data set


def test_digits_unflattened_and_fraction() -> None:
    ds = load_digits(test_fraction=0.5, flatten=False)
    assert ds.x_train.shape == (899, 1, 8, 8)
    assert ds.x_test.shape == (898, 1, 8, 8)
    flat = load_digits(test_fraction=0.5)
    assert torch.equal(ds.x_train.reshape(-1, 64), flat.x_train)
    with pytest.raises(ValueError, match="non-empty"):
        load_digits(test_fraction=0.0)


def test_dataset_to_and_validation(digits: Dataset) -> None:
    d64 = digits.to(dtype=torch.float64)
    assert d64.x_train.dtype == torch.float64 and d64.x_test.dtype == torch.float64
    assert d64.y_train.dtype == torch.int64
    assert digits.x_train.dtype == torch.float32  # original unchanged
    torch.testing.assert_close(d64.x_train.float(), digits.x_train)
    assert digits.to(device="cpu").x_train.device.type == "cpu"
    with pytest.raises(TypeError):
        digits.to(dtype=torch.int64)
    with pytest.raises(ValueError, match="rows"):
        Dataset(
            torch.zeros(3, 2),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(1, 2),
            torch.zeros(1, dtype=torch.long),
            2,
            "bad",
        )


# --------------------------------------------------------------------------- subset


def test_dataset_is_a_map_style_training_set(digits: Dataset) -> None:
    from torch.utils.data import DataLoader

    assert len(digits) == digits.n_train == 1438
    x0, y0 = digits[0]
    assert torch.equal(x0, digits.x_train[0]) and int(y0) == int(digits.y_train[0])
    batches = list(DataLoader(digits, batch_size=500))
    assert [len(b[1]) for b in batches] == [500, 500, 438]
    assert torch.equal(torch.cat([b[0] for b in batches]), digits.x_train)
    assert torch.equal(torch.cat([b[1] for b in batches]), digits.y_train)
    assert len(digits.train_set) == 1438 and len(digits.test_set) == digits.n_test == 359
    xt, yt = digits.test_set[3]
    assert torch.equal(xt, digits.x_test[3]) and int(yt) == int(digits.y_test[3])


def test_subset_deterministic(digits: Dataset) -> None:
    a = subset(digits, 100)
    b = subset(digits, 100)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.x_train.shape == (100, 64)
    assert a.x_test is digits.x_test and a.y_test is digits.y_test
    assert a.name == "digits[subset 100, seed 42]"
    c = subset(digits, 100, seed=7)
    assert not torch.equal(a.y_train, c.y_train)
    # Rows are genuine distinct training points.
    rows = {tuple(r) for r in digits.x_train.tolist()}
    assert all(tuple(r) in rows for r in a.x_train.tolist())
    assert len({tuple(r) for r in a.x_train.tolist()}) == 100
    with pytest.raises(ValueError):
        subset(digits, 0)
    with pytest.raises(ValueError):
        subset(digits, digits.n_train + 1)


# --------------------------------------------------------------------------- mnist1d


def test_mnist1d_shapes_and_rng_hygiene() -> None:
    pytest.importorskip("mnist1d")
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)

    ds = load_mnist1d()  # about 1 s: generated once for the whole test

    assert np.random.rand() == expected_np and random.random() == expected_py
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.y_train.shape == (4000,) and ds.y_test.shape == (1000,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and ds.name == "mnist1d"
    assert set(ds.y_train.tolist()) == set(range(10))
    torch.testing.assert_close(ds.x_train.mean(0), torch.zeros(40), atol=1e-4, rtol=0)
    torch.testing.assert_close(ds.x_train.std(0, unbiased=False), torch.ones(40), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- IDX files


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_folder(folder: Path, gz: bool = False, rng_seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(rng_seed)
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, size=(5, 28, 28)),
        "train-labels-idx1-ubyte": np.array([3, 0, 9, 1, 7]),
        "t10k-images-idx3-ubyte": rng.randint(0, 256, size=(3, 28, 28)),
        "t10k-labels-idx1-ubyte": np.array([2, 8, 5]),
    }
    arrays["train-images-idx3-ubyte"][0, 0, :2] = [0, 255]  # pin the extremes
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = _idx_bytes(0x803 if arr.ndim == 3 else 0x801, arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def _expected(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float64)) / 255.0
    return ((x - 0.1307) / 0.3081).float()


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("sub", ["", "raw"], ids=["root", "raw-subfolder"])
def test_idx_round_trip(tmp_path: Path, gz: bool, sub: str) -> None:
    arrays = _write_idx_folder(tmp_path / sub if sub else tmp_path, gz=gz)
    ds = load_mnist(tmp_path)
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (5, 784) and ds.x_test.shape == (3, 784)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.y_train, torch.tensor([3, 0, 9, 1, 7]))
    assert torch.equal(ds.y_test, torch.tensor([2, 8, 5]))
    exp_train = _expected(arrays["train-images-idx3-ubyte"])
    exp_test = _expected(arrays["t10k-images-idx3-ubyte"])
    assert torch.equal(ds.x_train, exp_train.reshape(5, 784))
    assert torch.equal(ds.x_test, exp_test.reshape(3, 784))
    # The extremes map to -mean/std and (1-mean)/std.
    assert ds.x_train[0, 0].item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-6)
    assert ds.x_train[0, 1].item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-6)

    img = load_mnist(tmp_path, flatten=False)
    assert img.x_train.shape == (5, 1, 28, 28)
    assert torch.equal(img.x_train[:, 0], exp_train)


def test_fashion_mnist_uses_mnist_statistics(tmp_path: Path) -> None:
    arrays = _write_idx_folder(tmp_path / "FashionMNIST" / "raw", gz=True, rng_seed=1)
    ds = load_fashion_mnist(tmp_path)
    assert ds.name == "fashion_mnist"
    assert torch.equal(ds.x_test, _expected(arrays["t10k-images-idx3-ubyte"]).reshape(3, 784))


def test_read_idx_and_bad_magic(tmp_path: Path) -> None:
    arrays = _write_idx_folder(tmp_path)
    got = read_idx(tmp_path / "train-images-idx3-ubyte", 0x803)
    assert got.dtype == np.uint8 and np.array_equal(got, arrays["train-images-idx3-ubyte"])

    # A label file where an image file belongs.
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(0x801, np.arange(5)))
    with pytest.raises(ValueError, match="bad magic number 0x00000801, expected 0x00000803"):
        load_mnist(tmp_path)
    # Not an IDX file at all.
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x1f\x8b\x08\x00" + bytes(100))
    with pytest.raises(ValueError, match="bad magic number 0x1F8B0800"):
        load_mnist(tmp_path)


def test_truncated_idx(tmp_path: Path) -> None:
    arrays = _write_idx_folder(tmp_path)
    full = _idx_bytes(0x803, arrays["train-images-idx3-ubyte"])
    (tmp_path / "train-images-idx3-ubyte").write_bytes(full[:-10])
    with pytest.raises(ValueError, match="truncated IDX file.*needs 3920 data bytes, found 3910"):
        load_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(full[:10])
    with pytest.raises(ValueError, match="truncated IDX file .*header needs 16"):
        load_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(full)[:-20])
    with pytest.raises(ValueError, match="truncated"):
        load_mnist(tmp_path)


def test_label_count_mismatch(tmp_path: Path) -> None:
    _write_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(0x801, np.array([1, 2])))
    with pytest.raises(ValueError, match="3 images but the labels file 2 labels"):
        load_mnist(tmp_path)


def test_missing_folder_message(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    pattern = (
        rf"MNIST data folder {re.escape(str(root))} does not exist\. "
        r"Expected the four MNIST IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        r"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte .*"
        rf"put them in {re.escape(str(root))}; curvkit never downloads"
    )
    with pytest.raises(FileNotFoundError, match=pattern):
        load_mnist(root)
    with pytest.raises(FileNotFoundError, match=r"Fashion-MNIST data folder .*fashion-mnist"):
        load_fashion_mnist(root)


def test_missing_file_message(tmp_path: Path) -> None:
    _write_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path)
    msg = str(info.value)
    assert f"{tmp_path} lacks t10k-labels-idx1-ubyte." in msg
    assert all(name in msg for name in IDX_FILES)
    assert "curvkit never downloads" in msg

"""The :class:`Dataset` container, the bundled data sets (digits, MNIST-1D) and :func:`subset`."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

__all__ = ["Dataset", "load_digits", "load_mnist1d", "subset"]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset(TorchDataset[tuple[Tensor, Tensor]]):
    """A classification data set with a fixed train/test split.

    As a map-style ``torch.utils.data.Dataset`` it is the *training* split: ``len(ds)`` is
    ``n_train`` and ``ds[i]`` is ``(x_train[i], y_train[i])``, so
    ``DataLoader(load_digits(), batch_size=64, shuffle=True)`` iterates over training batches;
    :attr:`train_set` and :attr:`test_set` give both splits as ``TensorDataset`` objects.

    Attributes:
        x_train: Training inputs, shape ``(N_train, *input_shape)``, floating point
            (``float32`` as loaded).
        y_train: Training labels, shape ``(N_train,)``, ``int64`` in ``[0, num_classes)``.
        x_test: Test inputs, shape ``(N_test, *input_shape)``.
        y_test: Test labels, shape ``(N_test,)``, ``int64``.
        num_classes: Number of classes.
        name: Human-readable name, e.g. ``"digits"`` or ``"mnist[subset 1000, seed 42]"``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name}: x_{split} has {x.shape[0]} rows but y_{split} has {y.shape[0]}"
                )
            if y.dim() != 1:
                raise ValueError(f"{self.name}: y_{split} must be 1-D, got shape {tuple(y.shape)}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{self.name}: train inputs have shape {tuple(self.x_train.shape[1:])} but test "
                f"inputs {tuple(self.x_test.shape[1:])}"
            )

    @property
    def n_train(self) -> int:
        """Number of training points."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test points."""
        return int(self.x_test.shape[0])

    def __len__(self) -> int:
        """Number of training points (the map-style dataset is the training split)."""
        return self.n_train

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """The training pair ``(x_train[index], y_train[index])``."""
        return self.x_train[index], self.y_train[index]

    @property
    def train_set(self) -> TensorDataset:
        """The training split as a ``TensorDataset`` of ``(x_train, y_train)``."""
        return TensorDataset(self.x_train, self.y_train)

    @property
    def test_set(self) -> TensorDataset:
        """The test split as a ``TensorDataset`` of ``(x_test, y_test)``."""
        return TensorDataset(self.x_test, self.y_test)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(64,)`` or ``(1, 8, 8)``."""
        return tuple(self.x_train.shape[1:])

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Dataset:
        """Return a copy with converted tensors.

        Args:
            dtype: New floating dtype of the inputs; the labels stay ``int64``.
                ``None`` keeps the current dtype.
            device: Device for all four tensors; ``None`` keeps the current device.

        Returns:
            A new :class:`Dataset`; ``self`` is unchanged.
        """
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device=device, dtype=dtype),
            y_train=self.y_train.to(device=device),
            x_test=self.x_test.to(device=device, dtype=dtype),
            y_test=self.y_test.to(device=device),
        )

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.input_shape)
        return (
            f"Dataset(name={self.name!r}, train={self.n_train}x{shape}, "
            f"test={self.n_test}x{shape}, num_classes={self.num_classes}, "
            f"dtype={self.x_train.dtype}, device={self.x_train.device})"
        )


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardise both splits per feature with the training mean and standard deviation.

    Features that are constant on the training set (std 0) are only centred.
    """
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (x_train - mean) / std, (x_test - mean) / std


def _make(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    name: str,
) -> Dataset:
    return Dataset(
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64)),
        num_classes=num_classes,
        name=name,
    )


def load_digits(
    test_fraction: float = 0.2, seed: int = 0, flatten: bool = True, standardize: bool = True
) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

    The data ship with scikit-learn, so nothing is downloaded.

    Args:
        test_fraction: Fraction of the 1797 images held out for testing (rounded to the nearest
            integer count; 0.2 gives 359 test and 1438 training images).
        seed: Seed of the ``numpy.random.RandomState`` that permutes the images before the
            split; the same seed always gives the same split.
        flatten: If ``True`` the inputs have shape ``(N, 64)``, otherwise ``(N, 1, 8, 8)``.
        standardize: If ``True`` standardise every pixel with the training-set mean and
            standard deviation (pixels that are constant on the training set are only
            centred). If ``False`` the raw pixel values in ``[0, 16]`` are kept.

    Returns:
        A :class:`Dataset` named ``"digits"``.

    Raises:
        ValueError: If ``test_fraction`` leaves an empty training or test set.
        ImportError: If scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from err

    bunch = _sk_load_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    n = x.shape[0]
    n_test = int(round(test_fraction * n))
    if not 0 < n_test < n:
        raise ValueError(
            f"test_fraction={test_fraction} gives {n_test} test images out of {n}; "
            "both splits must be non-empty"
        )
    perm = np.random.RandomState(seed).permutation(n)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    x_train, x_test = x[train_idx], x[test_idx]
    if standardize:
        x_train, x_test = _standardize(x_train, x_test)
    if not flatten:
        x_train = x_train.reshape(-1, 1, 8, 8)
        x_test = x_test.reshape(-1, 1, 8, 8)
    return _make(x_train, y[train_idx], x_test, y[test_idx], 10, "digits")


def load_mnist1d(seed: int = 42, standardize: bool = True) -> Dataset:
    """MNIST-1D (Greydanus, 2020), generated procedurally: 4000 train / 1000 test, 40 features.

    Calls ``mnist1d.data.make_dataset`` with the package's default arguments and the given
    ``seed`` (42 reproduces the published data set's recipe); ``get_dataset`` is never used,
    so nothing is downloaded or cached on disk. Generation takes about one second on a CPU.

    ``make_dataset`` reseeds the global ``random`` and ``numpy.random`` generators; their
    states are saved beforehand and restored afterwards, so calling this function does not
    disturb other random streams.

    Args:
        seed: Generation seed; the train/test split is the package's fixed one (first 80%
            of the shuffled samples for training).
        standardize: If ``True`` standardise every feature with the training-set mean and
            standard deviation. If ``False`` keep ``make_dataset``'s output, which is already
            centred and scaled to unit standard deviation globally (over all features and
            both splits).

    Returns:
        A :class:`Dataset` named ``"mnist1d"`` with inputs of shape ``(N, 40)``.

    Raises:
        ImportError: If the ``mnist1d`` package is not installed.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError("load_mnist1d needs the mnist1d package: pip install mnist1d") from err

    args = get_dataset_args()
    args.seed = seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    x_train = np.asarray(data["x"], dtype=np.float64)
    x_test = np.asarray(data["x_test"], dtype=np.float64)
    if standardize:
        x_train, x_test = _standardize(x_train, x_test)
    return _make(x_train, data["y"], x_test, data["y_test"], 10, "mnist1d")


def subset(ds: Dataset, n: int, seed: int = 42) -> Dataset:
    """A fixed random subset of ``n`` training points; the test set is unchanged.

    Used e.g. for the "1000-image subset" of Benzing (2022). The indices are drawn without
    replacement by a CPU ``torch.Generator`` seeded with ``seed`` and kept in their original
    order, so the same ``(ds, n, seed)`` always gives the same subset, and for a fixed seed a
    smaller subset is contained in a larger one.

    Args:
        ds: The data set.
        n: Number of training points to keep, ``1 <= n <= ds.n_train``.
        seed: Seed of the subset.

    Returns:
        A new :class:`Dataset` named ``"<name>[subset n, seed s]"``.

    Raises:
        ValueError: If ``n`` is out of range.
    """
    if not 1 <= n <= ds.n_train:
        raise ValueError(f"n must be in [1, {ds.n_train}] for {ds.name}, got {n}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(ds.n_train, generator=gen)[:n].sort().values
    idx = idx.to(ds.x_train.device)
    return dataclasses.replace(
        ds,
        x_train=ds.x_train[idx],
        y_train=ds.y_train[idx],
        name=f"{ds.name}[subset {n}, seed {seed}]",
    )

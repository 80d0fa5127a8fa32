"""Small classification data sets with fixed train/test splits, loaded without any download.

* :func:`load_digits` — scikit-learn's bundled 8x8 handwritten digits (1797 images).
* :func:`load_mnist1d` — MNIST-1D, generated procedurally by the ``mnist1d`` package.
* :func:`load_mnist`, :func:`load_fashion_mnist` — MNIST / Fashion-MNIST read from the standard
  IDX files in a local folder, preprocessed as in Benzing (2022).
* :func:`subset` — a fixed random subset of the training points (e.g. the paper's
  "1000-image subset").

Nothing here touches the network: MNIST-type files must already be on disk, and a missing file
raises :class:`FileNotFoundError` saying which files are expected and where to put them.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import random
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

__all__ = [
    "Dataset",
    "load_digits",
    "load_mnist1d",
    "load_mnist",
    "load_fashion_mnist",
    "read_idx",
    "subset",
    "MNIST_MEAN",
    "MNIST_STD",
    "IDX_FILES",
]

#: Mean and standard deviation of the MNIST training pixels after scaling to ``[0, 1]``.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

#: The four IDX file names of MNIST and Fashion-MNIST (each may also carry a ``.gz`` suffix).
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


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


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (raw, or gzip-compressed if the name ends in ``.gz``) of unsigned bytes.

    The IDX format is a 4-byte big-endian magic number ``0x000008DD`` (``0x08`` = unsigned
    byte, ``DD`` = number of dimensions), one big-endian ``uint32`` per dimension, then the
    data in C order.

    Args:
        path: The file.
        expected_magic: If given, the magic number the file must have, e.g. ``0x00000803``
            for an image file or ``0x00000801`` for a label file.

    Returns:
        A ``uint8`` array with the stored shape.

    Raises:
        ValueError: If the magic number is wrong or not an unsigned-byte IDX type, or the file
            is truncated (or has trailing bytes, or is a corrupt gzip stream).
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}: cannot read IDX file ({err}); it may be truncated") from err

    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, no complete header)")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: bad magic number 0x{magic:08X}, expected 0x{expected_magic:08X}; "
            "is this the right file, and is it decompressed correctly?"
        )
    if magic >> 8 != 0x08:
        raise ValueError(
            f"{path}: bad magic number 0x{magic:08X}; only unsigned-byte IDX files "
            "(0x000008DD) are supported"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, header needs {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape, dtype=np.int64))
    got = len(raw) - header
    if got < size:
        raise ValueError(
            f"{path}: truncated IDX file: shape {shape} needs {size} data bytes, found {got}"
        )
    if got > size:
        raise ValueError(
            f"{path}: IDX file has {got - size} unexpected trailing bytes after shape {shape}"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(shape).copy()


def _find_idx_files(
    root: str | os.PathLike[str], title: str, homepage: str, subfolder: str
) -> list[Path]:
    """Locate the four IDX files under ``root`` (or ``root/raw``, ``root/<subfolder>/raw``)."""
    root = Path(root).expanduser()
    expected = ", ".join(IDX_FILES)
    where = (
        f"Expected the four {title} IDX files {expected} (each raw or gzipped with a .gz "
        f"suffix), directly in {root} or in {root / 'raw'}. Download them from the dataset's "
        f"homepage ({homepage}) and put them in {root}; curvkit never downloads."
    )
    if not root.is_dir():
        raise FileNotFoundError(f"{title} data folder {root} does not exist. {where}")

    folders = [root, root / "raw", root / subfolder / "raw"]
    found: list[Path] = []
    missing: list[str] = []
    for name in IDX_FILES:
        for folder in folders:
            hit = next((folder / n for n in (name, name + ".gz") if (folder / n).is_file()), None)
            if hit is not None:
                found.append(hit)
                break
        else:
            missing.append(name)
    if missing:
        raise FileNotFoundError(f"{title} data folder {root} lacks {', '.join(missing)}. {where}")
    return found


def _load_idx_dataset(
    root: str | os.PathLike[str],
    flatten: bool,
    name: str,
    title: str,
    homepage: str,
    subfolder: str,
) -> Dataset:
    paths = _find_idx_files(root, title, homepage, subfolder)
    arrays = [
        read_idx(p, _IDX_IMAGES_MAGIC if "images" in p.name else _IDX_LABELS_MAGIC) for p in paths
    ]
    x_train, y_train, x_test, y_test = arrays
    for images, labels, split in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{title}: {split} images file holds {images.shape[0]} images but the labels "
                f"file {labels.shape[0]} labels"
            )
        if labels.size and labels.max() >= 10:
            raise ValueError(f"{title}: {split} labels must be in 0..9, found {labels.max()}")

    def prep(images: np.ndarray) -> np.ndarray:
        x = (images.astype(np.float64) / 255.0 - MNIST_MEAN) / MNIST_STD
        n, rows, cols = images.shape
        return x.reshape(n, rows * cols) if flatten else x.reshape(n, 1, rows, cols)

    return _make(prep(x_train), y_train, prep(x_test), y_test, 10, name)


def load_mnist(root: str | os.PathLike[str], flatten: bool = True) -> Dataset:
    """MNIST (60000 train / 10000 test 28x28 images) from the standard IDX files in ``root``.

    ``root`` must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each raw or with a ``.gz``
    suffix, directly or in a ``raw/`` subfolder (torchvision's layout; ``root/MNIST/raw`` is
    also searched, so a torchvision root works as is). Nothing is downloaded. The files'
    train/test split is the fixed split.

    Preprocessing as in Benzing (2022): pixels are scaled to ``[0, 1]`` and then standardised
    with the MNIST statistics ``(x - 0.1307) / 0.3081``.

    Args:
        root: Folder containing the IDX files.
        flatten: If ``True`` the inputs have shape ``(N, 784)``, otherwise ``(N, 1, 28, 28)``.

    Returns:
        A :class:`Dataset` named ``"mnist"``.

    Raises:
        FileNotFoundError: If ``root`` or one of the four files is missing; the message lists
            the expected file names and says where to put them.
        ValueError: If a file has a bad magic number, is truncated, or image and label counts
            disagree.
    """
    return _load_idx_dataset(
        root, flatten, "mnist", "MNIST", "http://yann.lecun.com/exdb/mnist/", "MNIST"
    )


def load_fashion_mnist(root: str | os.PathLike[str], flatten: bool = True) -> Dataset:
    """Fashion-MNIST (60000 train / 10000 test 28x28 images) from the IDX files in ``root``.

    Same file names, layout and fixed split as :func:`load_mnist` (``root/FashionMNIST/raw``
    is searched too, torchvision's layout). Nothing is downloaded.

    Preprocessing as in Benzing (2022): pixels are scaled to ``[0, 1]`` and standardised with
    the *MNIST* statistics ``(x - 0.1307) / 0.3081``, not Fashion-MNIST's own; the paper did
    this "due to an oversight", and it is reproduced here so results match the paper.

    Args:
        root: Folder containing the IDX files.
        flatten: If ``True`` the inputs have shape ``(N, 784)``, otherwise ``(N, 1, 28, 28)``.

    Returns:
        A :class:`Dataset` named ``"fashion_mnist"``.

    Raises:
        FileNotFoundError: If ``root`` or one of the four files is missing; the message lists
            the expected file names and says where to put them.
        ValueError: If a file has a bad magic number, is truncated, or image and label counts
            disagree.
    """
    return _load_idx_dataset(
        root,
        flatten,
        "fashion_mnist",
        "Fashion-MNIST",
        "https://github.com/zalandoresearch/fashion-mnist",
        "FashionMNIST",
    )


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

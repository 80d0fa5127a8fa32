"""MNIST and Fashion-MNIST from the standard IDX files in a local folder (no download).

Preprocessed as in Benzing (2022): pixels scaled to ``[0, 1]`` and standardised with the MNIST
training mean and standard deviation.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from curvkit.datasets.core import Dataset, _make

__all__ = ["IDX_FILES", "MNIST_MEAN", "MNIST_STD", "load_fashion_mnist", "load_mnist", "read_idx"]

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

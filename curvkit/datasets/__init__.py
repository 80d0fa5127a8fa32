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

from curvkit.datasets.core import Dataset, load_digits, load_mnist1d, subset
from curvkit.datasets.idx import IDX_FILES, MNIST_MEAN, MNIST_STD, load_fashion_mnist, load_mnist, read_idx

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

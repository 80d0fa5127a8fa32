"""curvkit: exact and structured Fisher curvature for PyTorch networks.

Implements Benzing (2022), "Gradient Descent on Neurons and its Link to Approximate Second-Order
Optimization": exact subsampled Fisher (Woodbury), block-diagonal, KFAC, FOOF and diagonal
structures behind one operator contract, and applications built on it.
"""

from curvkit import capture, datasets, ewc, hypergrad, laplace, linalg, optim, validate
from curvkit.curvature import Curvature, fisher, register_structure, structures

__version__ = "0.1.0"

__all__ = [
    # curvature
    "fisher", "Curvature", "structures", "register_structure",
    # subpackages
    "linalg", "capture", "optim", "datasets",
    # applications
    "laplace", "validate", "ewc", "hypergrad",
]

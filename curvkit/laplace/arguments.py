"""Checks of :class:`~curvkit.laplace.LaplacePosterior`'s arguments, before anything is built."""

from __future__ import annotations

import numpy as np
from torch import Tensor


def check_arguments(inputs, targets, route: str, reduce_rank, num_data) -> None:
    """Raise a clear error for arguments the posterior cannot use (nothing is built before).

    Args:
        inputs: a tensor batch or an iterable of batches.
        targets: the targets of a tensor batch (or ``None``).
        route: ``"auto"``, ``"dual"`` or ``"primal"``.
        reduce_rank: ``"auto"``, ``True`` or ``False``.
        num_data: ``None`` or the positive training-set size ``n``.

    Raises:
        ValueError: an empty batch, targets of another length, or an unknown option value.
    """
    if isinstance(inputs, Tensor) and (inputs.dim() == 0 or inputs.shape[0] == 0):
        raise ValueError("LaplacePosterior: the batch is empty (inputs.shape[0] == 0); pass at "
                         "least one input to build the Fisher on")
    if isinstance(inputs, Tensor) and targets is not None and (
            not isinstance(targets, Tensor) or targets.shape[0] != inputs.shape[0]):
        got = targets.shape[0] if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must be a Tensor with {inputs.shape[0]} rows (one per input), "
                         f"got {got}")
    if route not in ("auto", "dual", "primal"):
        raise ValueError(f"route must be 'auto', 'dual' or 'primal', got {route!r}")
    if reduce_rank not in ("auto", True, False):
        raise ValueError(f"reduce_rank must be 'auto', True or False, got {reduce_rank!r}")
    if num_data is not None and (isinstance(num_data, bool)
                                 or not isinstance(num_data, (int, np.integer)) or num_data < 1):
        raise ValueError(f"num_data must be a positive int (the training-set size), got {num_data!r}")

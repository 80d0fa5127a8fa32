"""A cheap test that a tensor has no NaN or Inf entry (input and intermediate checks)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_finite"]


def all_finite(X: Tensor) -> bool:
    """Whether every entry of ``X`` is finite.

    One reduction instead of ``isfinite(X).all()`` (which writes a boolean mask and reads it
    again): a NaN or ±Inf entry makes the sum NaN or ±Inf, so a finite sum proves every entry
    finite. Only when the sum is not finite (a bad entry, or finite entries whose sum overflows)
    is the entrywise test run, so the answer is always exact.

    Args:
        X: any tensor (integer and boolean tensors are always finite).

    Returns:
        ``True`` if no entry is NaN or ±Inf.
    """
    if not (X.is_floating_point() or X.is_complex()) or X.numel() == 0:
        return True
    return bool(torch.isfinite(X.sum())) or bool(torch.isfinite(X).all())

"""Diagonal operator ``A = diag(d)``."""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.linalg.operator import LinearOperator, SingularError


class Diagonal(LinearOperator):
    """``diag(d)`` with ``d ≥ 0``: ``solve(v, λ) = v / (d + λ)``, ``logdet(λ) = Σ log(d + λ)``."""

    def __init__(self, d: Tensor, block_shapes=None, name: str | None = None) -> None:
        if d.dim() != 1:
            raise ValueError(f"diagonal must be 1-D, got shape {tuple(d.shape)}")
        if not torch.isfinite(d).all():
            raise FloatingPointError(f"{name or 'Diagonal'}: the diagonal has non-finite entries")
        super().__init__(d.shape[0], d.dtype, d.device, block_shapes, name)
        self.d = d

    def _matmat(self, X: Tensor) -> Tensor:
        return self.d[:, None] * X

    def _is_singular(self) -> bool:
        return bool((self.d <= 0).any())

    def _rank_bound(self) -> int:
        return int((self.d > 0).sum())

    def _solve(self, X: Tensor, damping: float, damping_mode: str) -> Tensor:
        return X / (self.d[:, None] + damping)

    def _logdet(self, damping: float) -> Tensor:
        s = self.d.to(torch.float64) + damping
        if (s <= 0).any():
            raise SingularError(f"{self.name} + {damping}·I is singular; pass damping > 0")
        return s.log().sum()

    def diagonal(self) -> Tensor:
        return self.d.clone()

    def to_dense(self) -> Tensor:
        return torch.diag(self.d)

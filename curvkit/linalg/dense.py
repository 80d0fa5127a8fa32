"""Explicit dense symmetric PSD operator (small ``P``; tests and the primal route)."""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import override

from curvkit.linalg.cholesky import SPDFactor, damped_cholesky
from curvkit.linalg.operator import Damping, LinearOperator


class Dense(LinearOperator):
    """``A`` given as an explicit ``(P, P)`` symmetric PSD matrix; solves by float64 Cholesky.

    Every damping (scalar or per parameter) is exact: ``A + D`` is factorised by
    :func:`~curvkit.linalg.damped_cholesky`; the Gaussian methods use that factorisation.

    Args:
        A: the ``(P, P)`` matrix.
        block_shapes, name: see :class:`~curvkit.linalg.LinearOperator`.

    Raises:
        ValueError: ``A`` is not square.
        FloatingPointError: ``A`` has non-finite entries.
    """

    def __init__(self, A: Tensor, block_shapes=None, name: str | None = None) -> None:
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A must be square, got shape {tuple(A.shape)}")
        if not torch.isfinite(A).all():
            raise FloatingPointError(f"{name or 'Dense'}: the matrix has non-finite entries")
        super().__init__(A.shape[0], A.dtype, A.device, block_shapes, name)
        self.A = A
        self._chol: dict[float, SPDFactor] = {}

    def _chol_of(self, damping: Damping) -> SPDFactor:
        if isinstance(damping, Tensor):
            return damped_cholesky(self.A, damping, name=self.name)
        if damping not in self._chol:
            self._chol = {damping: damped_cholesky(self.A, damping, name=self.name)}
        return self._chol[damping]

    _dense_factor = _chol_of

    def _matmat(self, X: Tensor) -> Tensor:
        return self.A @ X

    def _solve(self, X: Tensor, damping: Damping, damping_mode: str) -> Tensor:
        return self._chol_of(damping).solve(X).to(X.dtype)

    def _logdet(self, damping: Damping) -> Tensor:
        return self._chol_of(damping).logdet()

    @override
    def diagonal(self) -> Tensor:
        return self.A.diagonal().clone()

    @override
    def to_dense(self) -> Tensor:
        return self.A.clone()

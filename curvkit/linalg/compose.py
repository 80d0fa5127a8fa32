"""Operators composed from others: ``(A + D)⁻¹``, ``A + B``, ``c·A`` and ``A @ B``.

``c·A`` forwards every method of the contract to ``A`` with the damping divided by ``c`` (e.g. the
Laplace precision ``n·F + D`` of Benzing 2022, App. C.1, is ``F`` damped by ``D/n``, scaled by ``n``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from curvkit.linalg.operator import Damping, LinearOperator, damping_str

__all__ = ["InverseOperator"]


def _apply_diag(d: Damping, X: Tensor) -> Tensor:
    """``D X`` for a scalar or ``(P,)`` damping."""
    return d.to(X.dtype)[:, None] * X if isinstance(d, Tensor) else d * X


class InverseOperator(LinearOperator):
    """``(A + D)⁻¹`` for a base operator ``A``; ``@`` calls ``A.solve``."""

    def __init__(self, base: LinearOperator, damping: Damping, damping_mode: str = "exact") -> None:
        super().__init__(base.shape[0], base.dtype, base.device, base.block_shapes,
                         name=f"({base.name} + {damping_str(damping)})⁻¹")
        self.base, self.damping, self.damping_mode = base, damping, damping_mode

    def _matmat(self, X: Tensor) -> Tensor:
        return self.base._solve(X, self.damping, self.damping_mode)

    def _solve(self, X: Tensor, damping: Damping, damping_mode: str) -> Tensor:
        if isinstance(damping, Tensor) or damping != 0:
            raise NotImplementedError(f"{self.name}: solve with extra damping is not supported")
        return self.base._matmat(X) + _apply_diag(self.damping, X)

    def _logdet(self, damping: Damping) -> Tensor:
        if isinstance(damping, Tensor) or damping != 0:
            return super()._logdet(damping)
        if self.damping_mode != "exact":
            return super()._logdet(0.0)
        return -self.base._logdet(self.damping)


class _Sum(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        if a.shape != b.shape:
            raise ValueError(f"cannot add operators of shapes {a.shape} and {b.shape}")
        super().__init__(a.shape[0], a.dtype, a.device, a.block_shapes, name=f"{a.name}+{b.name}")
        self.a, self.b = a, b

    def _matmat(self, X: Tensor) -> Tensor:
        return self.a._matmat(X) + self.b._matmat(X)

    def _rank_bound(self) -> int:
        return min(self.shape[0], self.a._rank_bound() + self.b._rank_bound())

    def _is_singular(self) -> bool:  # rank(A + B) ≤ rank A + rank B
        return self._rank_bound() < self.shape[0]

    def diagonal(self) -> Tensor:
        return self.a.diagonal() + self.b.diagonal()


class _Scaled(LinearOperator):
    """``c·A``: every method maps to ``A`` with the damping divided by ``c``."""

    def __init__(self, a: LinearOperator, c: float) -> None:
        if c < 0:
            raise ValueError(f"scaling must be ≥ 0 to keep the operator PSD, got {c}")
        super().__init__(a.shape[0], a.dtype, a.device, a.block_shapes, name=f"{c}·{a.name}")
        self.a, self.c = a, c
        self.damping_modes = a.damping_modes

    def _matmat(self, X: Tensor) -> Tensor:
        return self.c * self.a._matmat(X)

    def _is_singular(self) -> bool:
        return self.c == 0 or self.a._is_singular()

    def _rank_bound(self) -> int:
        return 0 if self.c == 0 else self.a._rank_bound()

    def _solve(self, X: Tensor, damping: Damping, damping_mode: str) -> Tensor:
        if self.c == 0:
            return X / damping[:, None] if isinstance(damping, Tensor) else X / damping
        return self.a._solve(X, damping / self.c, damping_mode) / self.c

    def _prepare(self, damping: float, damping_mode: str) -> None:
        if self.c != 0:
            self.a._prepare(damping / self.c, damping_mode)

    def _logdet(self, damping: Damping) -> Tensor:
        if self.c == 0:
            if isinstance(damping, Tensor):
                return damping.log().sum()
            return torch.tensor(self.shape[0] * math.log(damping), dtype=torch.float64)
        return self.shape[0] * math.log(self.c) + self.a._logdet(damping / self.c)

    def _nonzero(self) -> None:
        if self.c == 0:
            raise NotImplementedError(f"{self.name}: the zero operator; use the damping alone")

    def _sample(self, k: int, damping: Damping, generator: torch.Generator | None) -> Tensor:
        self._nonzero()
        # draws are fresh tensors: scaled in place (no second (P, k) allocation)
        return self.a._sample(k, damping / self.c, generator).div_(math.sqrt(self.c))

    def _inverse_diagonal(self, damping: Damping) -> Tensor:
        self._nonzero()
        return self.a._inverse_diagonal(damping / self.c) / self.c

    def _inverse_quad_blocks(self, J, R: int, damping: Damping) -> Tensor:
        self._nonzero()
        return self.a._inverse_quad_blocks(J, R, damping / self.c) / self.c

    def _eigenvalues(self) -> Tensor:
        return self.c * self.a.eigenvalues()

    def _logdet_function(self, group_sizes: list[int] | None) -> Callable[[Tensor], Tensor]:
        self._nonzero()
        fa, shift, P = self.a._logdet_function(group_sizes), math.log(self.c), self.shape[0]
        return lambda t: P * shift + fa(t - shift)

    def diagonal(self) -> Tensor:
        return self.c * self.a.diagonal()


class _Product(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        super().__init__(a.shape[0], a.dtype, a.device, a.block_shapes, name=f"{a.name}@{b.name}")
        self.a, self.b = a, b

    def _matmat(self, X: Tensor) -> Tensor:
        return self.a._matmat(self.b._matmat(X))

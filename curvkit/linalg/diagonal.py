"""Diagonal operator ``A = diag(a)`` (e.g. the diagonal Fisher; Benzing 2022, App. C.1 "diag")."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from typing_extensions import override

from curvkit.linalg.lowrank import chunked_group_grams
from curvkit.linalg.operator import Damping, LinearOperator, SingularError, damping_str


def _plus(d: Tensor, damping: Damping) -> Tensor:
    """``a + d`` in float64 for a scalar or ``(P,)`` damping."""
    return d.to(torch.float64) + (damping.to(d.device) if isinstance(damping, Tensor) else damping)


class Diagonal(LinearOperator):
    """``diag(a)`` with ``a ≥ 0``; every damping (scalar or per parameter) is exact.

    ``solve(v, D) = v / (a + d)``, ``logdet(D) = Σ log(a + d)``, samples ``z / √(a + d)``,
    ``diag((A + D)⁻¹) = 1 / (a + d)``.

    Args:
        d: the ``(P,)`` diagonal ``a``.
        block_shapes, name: see :class:`~curvkit.linalg.LinearOperator`.

    Raises:
        ValueError: ``d`` is not 1-D.
        FloatingPointError: ``d`` has non-finite entries.
    """

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

    def _damped(self, damping: Damping) -> Tensor:
        s = _plus(self.d, damping)
        if (s <= 0).any():
            raise SingularError(f"{self.name} + {damping_str(damping)} is singular; pass damping > 0")
        return s

    def _solve(self, X: Tensor, damping: Damping, damping_mode: str) -> Tensor:
        if isinstance(damping, Tensor):
            return (X / self._damped(damping)[:, None]).to(X.dtype)
        return X / (self.d[:, None] + damping)

    def _logdet(self, damping: Damping) -> Tensor:
        return self._damped(damping).log().sum()

    # ------------------------------------------------------------------ Gaussian methods
    def _sample(self, k: int, damping: Damping, generator: torch.Generator | None) -> Tensor:
        Z = torch.randn(self.shape[0], k, dtype=torch.float64, device=self.device, generator=generator)
        return (Z * self._damped(damping).rsqrt()[:, None]).to(self.dtype)

    def _inverse_diagonal(self, damping: Damping) -> Tensor:
        return 1.0 / self._damped(damping)

    def _inverse_quad_blocks(self, J, R: int, damping: Damping) -> Tensor:
        """``Jᵀ diag(a + d)⁻¹ J`` blocks, row block by row block of ``J``.

        A layer factor's block is
        :meth:`~curvkit.linalg.OuterProductFactor.weighted_block_grams64` with ``w = 1/(a + d)`` on
        its ``d_out × d_in`` grid (``T = 1``: ``Σ_i e_{ri} e_{r'i} W_{ni}``,
        ``W = (a_in ⊙ a_in) wᵀ``), no ``P × M`` matrix; other blocks use explicit float64
        columns in bounded chunks. Scalar and per-parameter damping alike.
        """
        from curvkit.linalg.outer import as_outer

        inv = 1.0 / self._damped(damping)
        out: Tensor | None = None
        off = 0
        for b in J.row_blocks():
            w = inv[off:off + b.size]
            off += b.size
            layer = as_outer(b)
            if layer is not None and layer[0].R == R:
                f, scale = layer
                q = f.weighted_block_grams64(w.reshape(f.d_out, f.d_in)) * scale**2
            else:
                r = w.sqrt()[:, None]
                q = chunked_group_grams(b, R, lambda X, r=r: X * r)
            out = q if out is None else out.add_(q)
        assert out is not None  # J has at least one row block
        return out

    def _eigenvalues(self) -> Tensor:
        return self.d.to(torch.float64).clamp_min(0.0)

    def _logdet_function(self, group_sizes: list[int] | None) -> Callable[[Tensor], Tensor]:
        if group_sizes is None:
            return super()._logdet_function(None)
        ev = self.eigenvalues()
        counts = torch.tensor(group_sizes, device=ev.device)
        return lambda t: torch.log(ev + torch.repeat_interleave(torch.exp(t), counts)).sum()

    @override
    def diagonal(self) -> Tensor:
        return self.d.clone()

    @override
    def to_dense(self) -> Tensor:
        self._check_dense_memory()
        return torch.diag(self.d)

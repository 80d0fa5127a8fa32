"""Low-rank operators ``A = U Uᵀ`` and their damped inverse by the Woodbury identity.

``U ∈ R^{P×M}`` is never materialised: a :class:`LowRankFactor` gives only ``Uᵀ X``, ``U W`` and
the ``M × M`` Gram ``K = Uᵀ U``. With ``λ > 0`` (math_spec §3.1, paper eq. 20)::

    (λ I_P + U Uᵀ)⁻¹ X = λ⁻¹ [ X − U (λ I_M + K)⁻¹ Uᵀ X ]
    log det(λ I_P + U Uᵀ) = (P − M) log λ + log det(λ I_M + K)

The ``M × M`` system is factorised once per damping value by Cholesky in float64 (eigh fallback).
When ``P ≤ M`` the "primal" route forms ``U Uᵀ`` (``P × P``) instead, which is cheaper and also
allows ``λ = 0`` when ``U Uᵀ`` is non-singular.

**Accuracy of the dual route.** With ``u = Uᵀ v``, ``w = (λI + K)⁻¹ u`` and ``x = (v − U w)/λ``,
let the three products carry errors ``K̂ = K + δK``, ``û = u + δu``, ``(U w)^ = U w + δs``.
To first order the true residual of the computed ``x̂`` is exactly::

    (U Uᵀ + λI) x̂ − v = U (δK w − δu)/λ − (I + U Uᵀ/λ) δs

so every product error is multiplied by up to ``‖K‖/λ = σ²_max/λ``, and it lies in (or is
projected onto) ``span(U)`` — where gradient right-hand sides put most of their mass. A float32
GEMM has relative error ≈ ``c·2⁻²⁴`` no matter how its inputs are split (its output is rounded
to 24 bits), so the residual is ≈ ``c·2⁻²⁴·σ²_max/λ``: 3e-3 on the loss gradient of an MLP with
P = 2.79M, N = 100, λ = 1e-3, while rounding the exact solution to float32 — the float32
representation limit — gives only 4e-5 (its errors are random and mostly outside ``span(U)``).
Refinement in ``M``-space cannot remove ``δu`` or ``δs``: they are made in the ``P``-sized
products, and measuring them needs another pass over ``P``-sized data in higher precision.
Hence all three products are **accumulated in float64** from the factor's stored data (products
of float32 numbers are exact in float64): ``K`` (:meth:`LowRankFactor.gram64`), ``u``
(:meth:`LowRankFactor.rmatmat64`) and ``(v − U w)/λ`` (:meth:`LowRankFactor.sub_matmat64`),
and ``x`` is rounded to the working dtype once. Then ``δ ≈ c·2⁻⁵³``: the residual is the float32
limit plus ≈ ``c·2⁻⁵³·σ²_max/λ`` (float64 solves: ≈ 1e-11 on the problem above). The float64
GEMMs cost about twice the float32 flops (time); layer factors convert ``v`` in row chunks, so no
``P``-sized float64 temporary is allocated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvkit.linalg.cholesky import SPDFactor, damped_cholesky
from curvkit.linalg.operator import LinearOperator, check_memory


class LowRankFactor:
    """Abstract ``U ∈ R^{P×M}`` given through products only.

    Attributes:
        size: ``P`` (rows).
        rank: ``M`` (columns).
        dtype, device: of the vectors it acts on.
    """

    size: int
    rank: int
    dtype: torch.dtype
    device: torch.device

    def rmatmat(self, X: Tensor) -> Tensor:
        """``Uᵀ X`` for ``X`` of shape ``(P, k)`` -> ``(M, k)``."""
        raise NotImplementedError

    def matmat(self, W: Tensor) -> Tensor:
        """``U W`` for ``W`` of shape ``(M, k)`` -> ``(P, k)``."""
        raise NotImplementedError

    def gram(self) -> Tensor:
        """``K = Uᵀ U`` of shape ``(M, M)``."""
        raise NotImplementedError

    def columns(self, start: int, stop: int) -> Tensor:
        """Columns ``U[:, start:stop]`` of shape ``(P, stop − start)``; default via ``U @ I``."""
        eye = torch.eye(self.rank, dtype=self.dtype, device=self.device)
        return self.matmat(eye[:, start:stop])

    def column_chunk(self) -> int:
        """Number of columns to materialise at once (about 256 MB per chunk)."""
        return max(1, min(self.rank, 2**28 // max(1, self.size * 8)))

    def sq_row_norms(self) -> Tensor:
        """``diag(U Uᵀ)`` of shape ``(P,)``; default from materialising ``U`` in chunks."""
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        c = self.column_chunk()
        for j in range(0, self.rank, c):
            out += (self.columns(j, min(j + c, self.rank)) ** 2).sum(1)
        return out

    # ------------------------------------------------ float64-accumulated products (solves)
    # Used by :class:`Woodbury` (see its docstring for why). The defaults materialise ``U`` in
    # float64 column chunks, which is exact whenever :meth:`columns` is (e.g. ``U @ e_m``); the
    # built-in factors override them with products on float64 copies of their small data.
    def columns64(self, start: int, stop: int) -> Tensor:
        """``U[:, start:stop]`` in float64."""
        return self.columns(start, stop).to(torch.float64)

    def _chunks64(self):
        c = self.column_chunk()
        for j in range(0, self.rank, c):
            yield j, min(j + c, self.rank), self.columns64(j, min(j + c, self.rank))

    def gram64(self) -> Tensor:
        """``K = Uᵀ U`` accumulated in float64, a new ``(M, M)`` float64 tensor."""
        if self.dtype == torch.float64:
            return self.gram()
        K = torch.empty(self.rank, self.rank, dtype=torch.float64, device=self.device)
        for j, k, C in self._chunks64():
            for i, l, D in self._chunks64():
                K[i:l, j:k] = D.T @ C
        return K

    def rmatmat64(self, X: Tensor) -> Tensor:
        """``Uᵀ X`` accumulated in float64; ``X`` ``(P, k)`` of any float dtype -> ``(M, k)`` float64."""
        X64 = X.to(torch.float64)
        if self.dtype == torch.float64:
            return self.rmatmat(X64)
        return torch.cat([C.T @ X64 for _, _, C in self._chunks64()], dim=0)

    def sub_matmat64(self, X: Tensor, W: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
        """``scale · (X − U W)`` accumulated in float64 and rounded once to ``X.dtype``.

        Args:
            X: ``(P, k)``, any float dtype.
            W: ``(M, k)``, float64.
            scale: applied in float64 before the rounding.
            out: optional ``(P, k)`` tensor of ``X.dtype`` to write the result into.

        Returns:
            ``out`` (or a new tensor of ``X.dtype``).
        """
        W = W.to(torch.float64)
        Y = X.to(torch.float64, copy=True)
        if self.dtype == torch.float64:
            Y -= self.matmat(W)
        else:
            for j, k, C in self._chunks64():
                Y.addmm_(C, W[j:k], alpha=-1.0)
        Y *= scale
        return Y.to(X.dtype) if out is None else out.copy_(Y)


class DenseFactor(LowRankFactor):
    """``U`` given explicitly as a ``(P, M)`` tensor (tests, small problems)."""

    def __init__(self, U: Tensor) -> None:
        if U.dim() != 2:
            raise ValueError(f"U must be 2-D (P, M), got shape {tuple(U.shape)}")
        self.U = U
        self.size, self.rank = U.shape
        self.dtype, self.device = U.dtype, U.device
        self._u64: Tensor | None = None

    def rmatmat(self, X: Tensor) -> Tensor:
        return self.U.T @ X

    def matmat(self, W: Tensor) -> Tensor:
        return self.U @ W

    def gram(self) -> Tensor:
        return self.U.T @ self.U

    def columns(self, start: int, stop: int) -> Tensor:
        return self.U[:, start:stop]

    def sq_row_norms(self) -> Tensor:
        return (self.U**2).sum(1)

    def _U64(self) -> Tensor:
        if self._u64 is None:
            self._u64 = self.U.to(torch.float64)
        return self._u64

    def columns64(self, start: int, stop: int) -> Tensor:
        return self._U64()[:, start:stop]

    def gram64(self) -> Tensor:
        U = self._U64()
        return U.T @ U

    def rmatmat64(self, X: Tensor) -> Tensor:
        return self._U64().T @ X.to(torch.float64)

    def sub_matmat64(self, X: Tensor, W: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
        Y = torch.addmm(X.to(torch.float64), self._U64(), W.to(torch.float64), alpha=-1.0).mul_(scale)
        return Y.to(X.dtype) if out is None else out.copy_(Y)


class StackedFactor(LowRankFactor):
    """Row-wise stack ``U = [U_1; U_2; …]`` of factors sharing the same ``M`` columns.

    Used for the full Fisher: each block is one layer, so ``K = Σ_l U_lᵀ U_l``.
    """

    def __init__(self, blocks: list[LowRankFactor]) -> None:
        if not blocks:
            raise ValueError("StackedFactor needs at least one block")
        ranks = {b.rank for b in blocks}
        if len(ranks) != 1:
            raise ValueError(f"all blocks must share the number of columns M, got {sorted(ranks)}")
        self.blocks = blocks
        self.sizes = [b.size for b in blocks]
        self.size, self.rank = sum(self.sizes), blocks[0].rank
        self.dtype, self.device = blocks[0].dtype, blocks[0].device

    def rmatmat(self, X: Tensor) -> Tensor:
        parts = X.split(self.sizes, dim=0)
        out = self.blocks[0].rmatmat(parts[0])
        for b, x in zip(self.blocks[1:], parts[1:]):
            out = out + b.rmatmat(x)
        return out

    def matmat(self, W: Tensor) -> Tensor:
        return torch.cat([b.matmat(W) for b in self.blocks], dim=0)

    def gram(self) -> Tensor:
        K = self.blocks[0].gram()
        for b in self.blocks[1:]:
            K = K + b.gram()
        return K

    def columns(self, start: int, stop: int) -> Tensor:
        return torch.cat([b.columns(start, stop) for b in self.blocks], dim=0)

    def sq_row_norms(self) -> Tensor:
        return torch.cat([b.sq_row_norms() for b in self.blocks])

    def columns64(self, start: int, stop: int) -> Tensor:
        return torch.cat([b.columns64(start, stop) for b in self.blocks], dim=0)

    def gram64(self) -> Tensor:
        K = self.blocks[0].gram64()
        for i, b in enumerate(self.blocks[1:]):
            K = K + b.gram64() if i == 0 else K.add_(b.gram64())  # K is fresh after the first sum
        return K

    def rmatmat64(self, X: Tensor) -> Tensor:
        parts = X.split(self.sizes, dim=0)
        out = self.blocks[0].rmatmat64(parts[0])
        for i, (b, x) in enumerate(zip(self.blocks[1:], parts[1:])):
            out = out + b.rmatmat64(x) if i == 0 else out.add_(b.rmatmat64(x))
        return out

    def sub_matmat64(self, X: Tensor, W: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
        if out is None:
            out = torch.empty_like(X)
        for b, x, o in zip(self.blocks, X.split(self.sizes, dim=0), out.split(self.sizes, dim=0)):
            b.sub_matmat64(x, W, scale, out=o)
        return out


class Woodbury(LinearOperator):
    """``A = U Uᵀ`` (``P × P``, rank ≤ M) with Woodbury solves through the ``M × M`` core.

    Args:
        factor: the low-rank factor ``U``.
        route: ``"dual"`` (``M × M`` system), ``"primal"`` (form ``U Uᵀ``), or ``"auto"``
            (primal when ``P ≤ M``).
        block_shapes, name: see :class:`~curvkit.linalg.operator.LinearOperator`.
    """

    def __init__(self, factor: LowRankFactor, route: str = "auto", block_shapes=None,
                 name: str | None = None) -> None:
        super().__init__(factor.size, factor.dtype, factor.device, block_shapes, name=name)
        if route not in ("auto", "dual", "primal"):
            raise ValueError(f"route must be 'auto', 'dual' or 'primal', got {route!r}")
        if route == "auto":
            route = "primal" if factor.size <= factor.rank else "dual"
        self.factor, self.route = factor, route
        self._gram: Tensor | None = None
        self._dense: Tensor | None = None
        self._chol: dict[float, SPDFactor] = {}

    # ------------------------------------------------------------------ pieces
    @property
    def rank(self) -> int:
        return self.factor.rank

    def gram(self) -> Tensor:
        """``K = Uᵀ U`` in float64 (cached)."""
        if self._gram is None:
            M = self.factor.rank
            check_memory(3 * M * M * 8, f"the {M}×{M} Gram of {self.name}", self.device)
            K = self.factor.gram64()
            if not torch.isfinite(K).all():
                raise FloatingPointError(f"{self.name}: the Gram matrix has non-finite entries")
            self._gram = 0.5 * (K + K.T)
        return self._gram

    def dense64(self) -> Tensor:
        """``U Uᵀ`` (``P × P``) in float64, formed from ``U`` (cached; primal route)."""
        if self._dense is None:
            P, M = self.factor.size, self.factor.rank
            check_memory(P * P * 8 + P * self.factor.column_chunk() * 16,
                         f"the {P}×{P} primal matrix of {self.name}", self.device)
            D = torch.zeros(P, P, dtype=torch.float64, device=self.device)
            c = self.factor.column_chunk()
            for j in range(0, M, c):  # U Uᵀ accumulated over column chunks of U
                U = self.factor.columns64(j, min(j + c, M))
                D.addmm_(U, U.T)
            self._dense = D
            if not torch.isfinite(self._dense).all():
                raise FloatingPointError(f"{self.name}: the factor has non-finite entries")
        return self._dense

    def _is_singular(self) -> bool:
        return self.factor.rank < self.factor.size or self.route == "dual"

    def _rank_bound(self) -> int:
        return min(self.factor.rank, self.factor.size)

    def _factorize(self, damping: float) -> SPDFactor:
        """Factorisation of ``λI + K`` (dual) or ``λI + UUᵀ`` (primal), float64 (:func:`damped_cholesky`)."""
        if damping in self._chol:
            return self._chol[damping]
        S = self.gram() if self.route == "dual" else self.dense64()
        fac = damped_cholesky(S, damping, name=self.name, symmetrize=False)
        if len(self._chol) > 8:
            self._chol.clear()
        self._chol[damping] = fac
        return fac

    @staticmethod
    def _apply_inv(fac: SPDFactor, B: Tensor) -> Tensor:
        return fac.solve(B)

    # ------------------------------------------------------------------ contract
    def _prepare(self, damping: float, damping_mode: str) -> None:
        self._factorize(damping)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.factor.matmat(self.factor.rmatmat(X))

    def _solve(self, X: Tensor, damping: float, damping_mode: str) -> Tensor:
        """``(UUᵀ + λI)⁻¹ X``; dual: ``x = (X − U w)/λ``, products accumulated in float64 (module doc)."""
        fac = self._factorize(damping)
        if self.route == "primal":
            return self._apply_inv(fac, X.to(torch.float64)).to(X.dtype)
        w = self._apply_inv(fac, self.factor.rmatmat64(X))
        return self.factor.sub_matmat64(X, w, 1.0 / damping)

    def _logdet(self, damping: float) -> Tensor:
        ld = self._factorize(damping).logdet()
        if self.route == "dual":
            ld = ld + (self.factor.size - self.factor.rank) * math.log(damping)
        return ld

    def diagonal(self) -> Tensor:
        return self.factor.sq_row_norms()

    def to_dense(self) -> Tensor:
        if self.route == "primal":
            return self.dense64().to(self.dtype)
        return super().to_dense()

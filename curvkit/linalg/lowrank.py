"""Low-rank factors ``U ∈ R^{P×M}`` given through products only, and their float64 Grams.

A :class:`LowRankFactor` gives ``Uᵀ X``, ``U W``, its columns and ``diag(U Uᵀ)``; the Woodbury
operator (Benzing 2022, App. C.1, eqs 8–11) needs from it only the ``M × M`` Gram ``K = Uᵀ U``,
cross-Grams ``U₁ᵀ U₂`` with test factors (GLM functional variances) and, for a diagonal damping
``D``, the whitened factor ``D^{-1/2} U`` (:meth:`LowRankFactor.whiten`). All Grams are
accumulated in float64 (``gram64`` & co.), also for float32 factors. Concrete factors:

* :class:`DenseFactor` -- an explicit ``(P, M)`` tensor;
* :class:`StackedFactor` -- ``[U_1; U_2; …]`` over parameter blocks sharing the ``M`` columns
  (``K = Σ_l U_lᵀ U_l``);
* :class:`ScaledFactor` -- ``s · U``;
* :class:`~curvkit.linalg.OuterProductFactor` -- one layer's per-sample gradients from inputs and
  errors (Hadamard-of-Grams products), in :mod:`curvkit.linalg.outer`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import override

from curvkit.linalg.memory import check_memory

#: Peak bytes of one chunk of ``(P, k)`` intermediates (samples, columns).
CHUNK_BYTES = 2**28

__all__ = ["LowRankFactor", "DenseFactor", "StackedFactor", "ScaledFactor", "CHUNK_BYTES",
           "rank_one_split"]


def column_group_grams(H: Tensor, R: int) -> Tensor:
    """``(n, R, R)`` Grams ``H_gᵀ H_g`` of the consecutive ``R``-column groups of ``H`` (``P × nR``)."""
    n = H.shape[1] // R
    G = H.reshape(H.shape[0], n, R)
    return torch.einsum("pnr,pnq->nrq", G, G)


def chunked_group_grams(J: LowRankFactor, R: int, transform) -> Tensor:
    """``(n, R, R)`` Grams ``H_gᵀ H_g`` of ``H = transform(J)``, over chunks of whole groups.

    ``J`` (``P × nR``) is materialised in float64 column chunks of about ``CHUNK_BYTES``
    (:meth:`LowRankFactor.columns64`), so the memory stays bounded whatever ``n``; ``transform``
    maps a ``(P, k)`` float64 chunk to the ``(P', k)`` matrix whose column Grams are wanted.
    One group that would not fit is refused with a GB estimate.
    """
    n = J.rank // R
    per_group = 3 * 8 * R * J.size
    check_memory(per_group, f"{R} explicit Jacobian columns of {J.size} parameters", J.device)
    g = max(1, min(n, CHUNK_BYTES // per_group))
    return torch.cat([column_group_grams(transform(J.columns64(i * R, min(n, i + g) * R)), R)
                      for i in range(0, n, g)])


def rank_one_split(S: Tensor, rtol: float = 1e-12) -> tuple[Tensor, Tensor] | None:
    """``(r, c)`` with ``S = r cᵀ`` if the positive matrix ``S`` has rank one, else ``None``."""
    r = S[:, 0]
    c = S[0, :] / S[0, 0]
    if torch.allclose(torch.outer(r, c), S, rtol=rtol, atol=0.0):
        return r, c
    return None


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

    def add_gram64_(self, K: Tensor) -> Tensor:
        """``K ← K + Uᵀ U`` (float64, in place; a stack of layers sums its blocks' Grams this way)."""
        return K.add_(self.gram64())

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

    # Working copies for Gaussian draws ``y − U w`` (:meth:`Woodbury.sample`): ``k`` row vectors
    # widened to float64 once, in the layout this factor's float64 GEMMs run fastest on; the
    # default layout is ``(P, k)`` with ``Xᵀ`` contiguous.
    def block64(self, Y: Tensor, buf: Tensor | None = None) -> Tensor:
        """A float64 working copy of the rows ``Y`` (``(k, P)``, any dtype/strides), in ``buf``."""
        B = torch.empty(Y.shape, dtype=torch.float64, device=Y.device) if buf is None else buf
        return B.view(Y.shape).copy_(Y).T

    def block_rmatmat64(self, B: Tensor) -> Tensor:
        """``Uᵀ Y`` (``(M, k)``, float64, accumulated in float64) of a :meth:`block64` copy."""
        return self.rmatmat64(B)

    def block_sub_matmat64_(self, B: Tensor, W: Tensor, scale: float) -> None:
        """``B ← scale · (B − U W)`` in place on a :meth:`block64` copy, accumulated in float64."""
        self.sub_matmat64(B, W, scale, out=B)

    def block_store(self, B: Tensor, out: Tensor, r: Tensor | None = None) -> None:
        """Write ``r ⊙`` a :meth:`block64` copy (``r``: optional ``(P,)``) into ``out`` ``(k, P)``."""
        X = B.T
        if r is not None:
            X.mul_(r.to(X))
        out.copy_(X)

    # ------------------------------------------------------------------ float64 Grams (Laplace)

    def row_blocks(self) -> list[LowRankFactor]:
        """The row blocks (one for an unstacked factor)."""
        return [self]

    def to64(self) -> LowRankFactor:
        """The same factor with float64 storage."""
        if self.dtype == torch.float64:
            return self
        return DenseFactor(self.dense(torch.float64))

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The explicit ``(P, M)`` matrix ``U`` (memory checked)."""
        dtype = dtype or self.dtype
        check_memory(self.size * self.rank * torch.finfo(dtype).bits // 8,
                     f"the explicit {self.size}×{self.rank} factor", self.device)
        return self.columns(0, self.rank).to(dtype)

    def gram_flops(self) -> float:
        """Approximate flops of :meth:`gram64` (for route selection)."""
        return 2.0 * self.rank**2 * self.size

    def cross_gram64(self, other: LowRankFactor) -> Tensor:
        """``Uᵀ W`` (``M × M_w``) in float64 for a factor ``W`` over the same rows."""
        return self.to64().rmatmat(other.dense(torch.float64))

    def block_grams64(self, R: int) -> Tensor:
        """Diagonal ``R × R`` blocks of ``Uᵀ U`` (consecutive column groups), float64 ``(M/R, R, R)``."""
        if self.rank % R:
            raise ValueError(f"rank {self.rank} is not a multiple of R = {R}")
        g = self.dense(torch.float64).reshape(self.size, self.rank // R, R)
        return torch.einsum("pnr,pnq->nrq", g, g)

    def outer_gram64(self) -> Tensor:
        """``U Uᵀ`` (``P × P``, float64), accumulated over column chunks."""
        P = self.size
        check_memory(2 * P * P * 8, f"the {P}×{P} matrix U Uᵀ", self.device)
        S = torch.zeros(P, P, dtype=torch.float64, device=self.device)
        c = self.column_chunk()
        for j in range(0, self.rank, c):
            U = self.columns(j, min(j + c, self.rank)).to(torch.float64)
            S.addmm_(U, U.T)
        return S

    def whiten(self, r: Tensor) -> LowRankFactor:
        """``diag(r) U`` for a positive ``(P,)`` row scaling ``r`` (e.g. ``D^{-1/2}``).

        A constant ``r`` keeps the factor's structure (:class:`ScaledFactor`); otherwise ``U`` is
        materialised (memory ``8·P·M`` bytes, checked). Layer factors override this to keep the
        Hadamard trick when ``r²`` is rank one on the layer grid.
        """
        if bool((r == r[0]).all()):
            return ScaledFactor(self, float(r[0]))
        check_memory(2 * self.size * self.rank * 8,
                     f"the per-sample gradients of a {self.size}-parameter block for M = "
                     f"{self.rank} columns (needed for a per-parameter damping that is not constant "
                     "per weight/bias tensor)", self.device)
        return DenseFactor(self.dense(torch.float64) * r.to(torch.float64)[:, None])


class DenseFactor(LowRankFactor):
    """``U`` given explicitly as a ``(P, M)`` tensor (tests, small problems)."""

    def __init__(self, U: Tensor) -> None:
        if U.dim() != 2:
            raise ValueError(f"U must be 2-D (P, M), got shape {tuple(U.shape)}")
        self.U = U
        self.size, self.rank = U.shape
        self.dtype, self.device = U.dtype, U.device
        self._u64: Tensor | None = None

    @override
    def rmatmat(self, X: Tensor) -> Tensor:
        return self.U.T @ X

    @override
    def matmat(self, W: Tensor) -> Tensor:
        return self.U @ W

    @override
    def gram(self) -> Tensor:
        return self.U.T @ self.U

    @override
    def columns(self, start: int, stop: int) -> Tensor:
        return self.U[:, start:stop]

    @override
    def sq_row_norms(self) -> Tensor:
        return (self.U**2).sum(1)

    def _U64(self) -> Tensor:
        if self._u64 is None:
            self._u64 = self.U.to(torch.float64)
        return self._u64

    @override
    def columns64(self, start: int, stop: int) -> Tensor:
        return self._U64()[:, start:stop]

    @override
    def gram64(self) -> Tensor:
        U = self._U64()
        return U.T @ U

    @override
    def rmatmat64(self, X: Tensor) -> Tensor:
        return self._U64().T @ X.to(torch.float64)

    @override
    def sub_matmat64(self, X: Tensor, W: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
        Y = torch.addmm(X.to(torch.float64), self._U64(), W.to(torch.float64), alpha=-1.0).mul_(scale)
        return Y.to(X.dtype) if out is None else out.copy_(Y)

    @override
    def block_sub_matmat64_(self, B: Tensor, W: Tensor, scale: float) -> None:
        B.addmm_(self._U64(), W.to(torch.float64), beta=scale, alpha=-scale)

    @override
    def to64(self) -> LowRankFactor:
        return self if self.dtype == torch.float64 else DenseFactor(self.U.double())

    @override
    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.U.to(dtype or self.dtype)

    @override
    def cross_gram64(self, other: LowRankFactor) -> Tensor:
        if isinstance(other, DenseFactor):
            return self.U.double().T @ other.U.double()
        return super().cross_gram64(other)

    @override
    def whiten(self, r: Tensor) -> LowRankFactor:
        return DenseFactor(self.U.to(torch.float64) * r.to(torch.float64)[:, None])


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

    @override
    def rmatmat(self, X: Tensor) -> Tensor:
        parts = X.split(self.sizes, dim=0)
        out = self.blocks[0].rmatmat(parts[0])
        for b, x in zip(self.blocks[1:], parts[1:]):
            out = out + b.rmatmat(x)
        return out

    @override
    def matmat(self, W: Tensor) -> Tensor:
        return torch.cat([b.matmat(W) for b in self.blocks], dim=0)

    @override
    def gram(self) -> Tensor:
        K = self.blocks[0].gram()
        for b in self.blocks[1:]:
            K = K + b.gram()
        return K

    @override
    def columns(self, start: int, stop: int) -> Tensor:
        return torch.cat([b.columns(start, stop) for b in self.blocks], dim=0)

    @override
    def sq_row_norms(self) -> Tensor:
        return torch.cat([b.sq_row_norms() for b in self.blocks])

    @override
    def row_blocks(self) -> list[LowRankFactor]:
        return list(self.blocks)

    @override
    def to64(self) -> LowRankFactor:
        return self if self.dtype == torch.float64 else StackedFactor([b.to64() for b in self.blocks])

    @override
    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return torch.cat([b.dense(dtype or self.dtype) for b in self.blocks], dim=0)

    @override
    def columns64(self, start: int, stop: int) -> Tensor:
        return torch.cat([b.columns64(start, stop) for b in self.blocks], dim=0)

    @override
    def gram64(self) -> Tensor:
        K = self.blocks[0].gram64()  # a new tensor (the contract of gram64), summed into in place
        for b in self.blocks[1:]:
            b.add_gram64_(K)
        return K

    @override
    def rmatmat64(self, X: Tensor) -> Tensor:
        parts = X.split(self.sizes, dim=0)
        out = self.blocks[0].rmatmat64(parts[0])
        for i, (b, x) in enumerate(zip(self.blocks[1:], parts[1:])):
            out = out + b.rmatmat64(x) if i == 0 else out.add_(b.rmatmat64(x))
        return out

    @override
    def sub_matmat64(self, X: Tensor, W: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
        if out is None:
            out = torch.empty_like(X)
        for b, x, o in zip(self.blocks, X.split(self.sizes, dim=0), out.split(self.sizes, dim=0)):
            b.sub_matmat64(x, W, scale, out=o)
        return out

    @override
    def gram_flops(self) -> float:
        return sum(b.gram_flops() for b in self.blocks)

    @override
    def cross_gram64(self, other: LowRankFactor) -> Tensor:
        ob = other.row_blocks()
        if [b.size for b in ob] != self.sizes:
            return super().cross_gram64(other)
        out = self.blocks[0].cross_gram64(ob[0])
        for x, y in zip(self.blocks[1:], ob[1:]):
            out += x.cross_gram64(y)
        return out

    @override
    def block_grams64(self, R: int) -> Tensor:
        out = self.blocks[0].block_grams64(R)
        for b in self.blocks[1:]:
            out += b.block_grams64(R)
        return out

    @override
    def whiten(self, r: Tensor) -> LowRankFactor:
        return StackedFactor([b.whiten(x) for b, x in zip(self.blocks, r.split(self.sizes))])


class ScaledFactor(LowRankFactor):
    """``s · U`` for a scalar ``s`` (any factor)."""

    def __init__(self, factor: LowRankFactor, scale: float) -> None:
        self.factor, self.scale = factor, float(scale)
        self.size, self.rank = factor.size, factor.rank
        self.dtype, self.device = factor.dtype, factor.device

    @override
    def rmatmat(self, X: Tensor) -> Tensor:
        return self.scale * self.factor.rmatmat(X)

    @override
    def matmat(self, W: Tensor) -> Tensor:
        return self.scale * self.factor.matmat(W)

    @override
    def gram(self) -> Tensor:
        return self.scale**2 * self.factor.gram()

    @override
    def columns(self, start: int, stop: int) -> Tensor:
        return self.scale * self.factor.columns(start, stop)

    @override
    def sq_row_norms(self) -> Tensor:
        return self.scale**2 * self.factor.sq_row_norms()

    @override
    def to64(self) -> LowRankFactor:
        return self if self.dtype == torch.float64 else ScaledFactor(self.factor.to64(), self.scale)

    @override
    def columns64(self, start: int, stop: int) -> Tensor:
        return self.scale * self.factor.columns64(start, stop)

    @override
    def rmatmat64(self, X: Tensor) -> Tensor:
        return self.scale * self.factor.rmatmat64(X)

    @override
    def sub_matmat64(self, X: Tensor, W: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
        return self.factor.sub_matmat64(X, self.scale * W.to(torch.float64), scale, out)

    @override
    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.scale * self.factor.dense(dtype)

    @override
    def gram64(self) -> Tensor:
        return self.scale**2 * self.factor.gram64()

    @override
    def gram_flops(self) -> float:
        return self.factor.gram_flops()

    @override
    def cross_gram64(self, other: LowRankFactor) -> Tensor:
        return self.scale * self.factor.cross_gram64(other)

    @override
    def block_grams64(self, R: int) -> Tensor:
        return self.scale**2 * self.factor.block_grams64(R)

    @override
    def whiten(self, r: Tensor) -> LowRankFactor:
        return self.factor.whiten(r * self.scale)

"""Helpers on :class:`~curvkit.linalg.LowRankFactor` s used by the Laplace algebra (float64).

* :class:`GemmOuterFactor` -- an :class:`~curvkit.linalg.OuterProductFactor` whose dense-layer
  products are laid out as plain GEMMs;
* :class:`ScaledFactor` -- ``s · U``;
* :func:`gram64` (``UᵀU``), :func:`outer_gram64` (``UUᵀ``), :func:`cross_gram64` (``U₁ᵀU₂``),
  :func:`block_grams64` (diagonal blocks of ``UᵀU``), :func:`dense_columns` (explicit ``U``),
  :func:`gram_flops`, :func:`to_float64`, :func:`colmajor`;
* :func:`softmax_null_basis` / :func:`reduce_softmax_errors` -- the exact softmax Fisher has rank
  ``C − 1`` per input: ``C`` columns become ``C − 1`` without changing ``G Gᵀ``;
* :func:`rank_one_split` -- ``S = r cᵀ`` detection (per-tensor priors keep the Hadamard trick).

Index letters as in :mod:`curvkit.linalg.outer` (``n`` input, ``r`` repeat, ``t`` location,
``o`` output unit, ``d`` input feature, ``k`` right-hand side).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.linalg.operator import check_memory
from curvkit.linalg.outer import OuterProductFactor, colmajor
from curvkit.linalg.woodbury import DenseFactor, LowRankFactor, StackedFactor

#: Peak bytes of one chunk of ``(P, k)`` intermediates (samples, columns).
CHUNK_BYTES = 2**28

__all__ = [
    "GemmOuterFactor", "ScaledFactor", "colmajor", "softmax_null_basis", "reduce_softmax_errors",
    "gram64", "outer_gram64", "cross_gram64", "block_grams64", "dense_columns", "to_float64",
    "gram_flops", "rank_one_split", "CHUNK_BYTES",
]


# ====================================================================== exact softmax Fisher rank
def softmax_null_basis(p: Tensor) -> Tensor:
    """Orthonormal bases ``Q_n ∈ R^{C×(C−1)}`` of ``√p_n^⊥``, one per row of ``p`` (Householder).

    The exact softmax Fisher factor ``S_n`` (rows ``s_c = √p_c (p − 1_c)``) satisfies
    ``Σ_c √p_c s_c = 0``, so its ``C`` columns of ``G`` span at most ``C − 1`` directions and
    ``G_n G_nᵀ = (G_n Q_n)(G_n Q_n)ᵀ`` with ``Q_n Q_nᵀ = I − u uᵀ``, ``u = √p/‖√p‖``.
    ``H = I − 2 v vᵀ/‖v‖²`` with ``v = u + 1_C`` (last unit vector) maps ``u`` to ``−1_C``; its
    first ``C − 1`` columns are orthonormal and orthogonal to ``u`` (``‖v‖² ≥ 2``: no cancellation).

    Args:
        p: ``(N, C)`` class probabilities.

    Returns:
        ``(N, C, C − 1)`` with ``Q_nᵀ Q_n = I`` and ``Q_nᵀ √p_n = 0``.
    """
    if p.dim() != 2 or p.shape[1] < 2:
        raise ValueError(f"p must be (N, C) with C ≥ 2, got shape {tuple(p.shape)}")
    u = p.clamp_min(0).sqrt()
    u = u / u.norm(dim=1, keepdim=True)
    v = u.clone()
    v[:, -1] += 1.0
    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    H = eye - 2.0 * v[:, :, None] * v[:, None, :] / (v * v).sum(1)[:, None, None]
    return H[:, :, :-1]


def reduce_softmax_errors(e: Tensor, p: Tensor) -> Tensor:
    """Rank ``C − 1`` per input: ``ẽ_{n k} = Σ_c Q_n[c, k] e_{n c}`` (same ``G Gᵀ``, fewer columns).

    Args:
        e: ``(N·C, T, d_out)`` errors of the exact softmax Fisher, input-major (``m = n·C + c``).
        p: ``(N, C)`` class probabilities at the same parameters.

    Returns:
        ``(N·(C−1), T, d_out)``, input-major.
    """
    N, C = p.shape
    if e.shape[0] != N * C:
        raise ValueError(f"e has {e.shape[0]} rows, expected N·C = {N * C}")
    Q = softmax_null_basis(p.to(e.dtype))
    out = torch.einsum("nck,ncto->nkto", Q, e.reshape(N, C, *e.shape[1:]))
    return out.reshape(N * (C - 1), *e.shape[1:])


#: Kept for the callers that named it: :class:`OuterProductFactor` itself now computes dense-layer
#: (``T = 1``) products as one GEMM plus one batched GEMM over inputs.
GemmOuterFactor = OuterProductFactor


class ScaledFactor(LowRankFactor):
    """``s · U`` for a scalar ``s`` (any factor)."""

    def __init__(self, factor: LowRankFactor, scale: float) -> None:
        self.factor, self.scale = factor, float(scale)
        self.size, self.rank = factor.size, factor.rank
        self.dtype, self.device = factor.dtype, factor.device

    def rmatmat(self, X: Tensor) -> Tensor:
        return self.scale * self.factor.rmatmat(X)

    def matmat(self, W: Tensor) -> Tensor:
        return self.scale * self.factor.matmat(W)

    def gram(self) -> Tensor:
        return self.scale**2 * self.factor.gram()

    def sq_row_norms(self) -> Tensor:
        return self.scale**2 * self.factor.sq_row_norms()


def to_float64(factor: LowRankFactor) -> LowRankFactor:
    """The same factor with float64 storage (layer factors, dense, stacked and scaled ones)."""
    if factor.dtype == torch.float64:
        return factor
    if isinstance(factor, OuterProductFactor):
        return GemmOuterFactor(factor.a.double(), factor.e.double(), factor.gram_route)
    if isinstance(factor, DenseFactor):
        return DenseFactor(factor.U.double())
    if isinstance(factor, StackedFactor):
        return StackedFactor([to_float64(b) for b in factor.blocks])
    if isinstance(factor, ScaledFactor):
        return ScaledFactor(to_float64(factor.factor), factor.scale)
    raise TypeError(f"cannot convert {type(factor).__name__} to float64")


def _blocks(factor: LowRankFactor) -> list[LowRankFactor]:
    return list(factor.blocks) if isinstance(factor, StackedFactor) else [factor]


def gram64(factor: LowRankFactor) -> Tensor:
    """``K = Uᵀ U`` in float64 (Hadamard of Grams for dense layers, summed over stacked blocks).

    Symmetric up to round-off (each block is a Gram matrix); consumers (Cholesky, ``eigvalsh``)
    read the lower triangle only.
    """
    K: Tensor | None = None
    for b in _blocks(factor):
        if isinstance(b, OuterProductFactor) and b.T == 1:
            a, e = b.a[:, 0, :].double(), b.e[:, 0, :].double()
            Ka = (a @ a.T)[:, None, :, None]
            if K is None:
                K = e @ e.T
                K.view(b.N, b.R, b.N, b.R).mul_(Ka)
            else:
                Ke = e @ e.T
                Ke.view(b.N, b.R, b.N, b.R).mul_(Ka)
                K += Ke
                del Ke
        else:
            Kb = to_float64(b).gram()
            K = Kb if K is None else K.add_(Kb)
    return K


def gram_flops(factor: LowRankFactor) -> float:
    """Approximate flops of :func:`gram64` (for route selection)."""
    total = 0.0
    for b in _blocks(factor):
        M = b.rank
        if isinstance(b, OuterProductFactor):
            if b.T == 1:
                total += 2.0 * (b.N**2 * b.d_in + M**2 * b.d_out) + M**2
            elif b.gram_route == "hadamard":
                total += 2.0 * (b.N**2 * b.d_in + M**2 * b.d_out) * b.T**2
            else:
                total += 2.0 * (M * b.T * b.size + M**2 * b.size)
        else:
            total += 2.0 * M**2 * b.size
    return total


def outer_gram64(factor: LowRankFactor) -> Tensor:
    """``U Uᵀ`` (``P × P``, float64, lower triangle valid), accumulated over column chunks."""
    P = factor.size
    S = torch.zeros(P, P, dtype=torch.float64, device=factor.device)
    blocks = _blocks(factor)
    if all(isinstance(b, OuterProductFactor) for b in blocks):
        # chunk over inputs: the columns of a chunk are the per-sample gradients of those inputs
        R = blocks[0].R
        step = max(1, CHUNK_BYTES // max(1, 8 * P * R))
        for i in range(0, blocks[0].N, step):
            sub = StackedFactor([OuterProductFactor(b.a[i:i + step], b.e[i * b.R:(i + step) * b.R],
                                                    b.gram_route) for b in blocks])
            cols = dense_columns(sub, torch.float64)
            S.addmm_(cols, cols.T)
    else:
        cols = dense_columns(factor, torch.float64)
        S.addmm_(cols, cols.T)
    return S


def dense_columns(factor: LowRankFactor, dtype: torch.dtype | None = None) -> Tensor:
    """The explicit ``(P, M)`` factor (per-sample gradients for layer factors)."""
    dtype = dtype or factor.dtype
    check_memory(factor.size * factor.rank * torch.finfo(dtype).bits // 8,
                 f"the explicit {factor.size}×{factor.rank} factor", factor.device)
    parts = []
    for b in _blocks(factor):
        if isinstance(b, OuterProductFactor):
            parts.append(b.per_sample_gradients().reshape(b.rank, -1).T.to(dtype))
        elif isinstance(b, DenseFactor):
            parts.append(b.U.to(dtype))
        elif isinstance(b, ScaledFactor):
            parts.append(b.scale * dense_columns(b.factor, dtype))
        else:
            parts.append(b.matmat(torch.eye(b.rank, dtype=b.dtype, device=b.device)).to(dtype))
    return torch.cat(parts, dim=0)


def cross_gram64(F1: LowRankFactor, F2: LowRankFactor) -> Tensor:
    """``F1ᵀ F2`` (``M1 × M2``) in float64; both stacked over the same row blocks."""
    b1, b2 = _blocks(F1), _blocks(F2)
    if [b.size for b in b1] != [b.size for b in b2]:
        raise ValueError("cross_gram64: the factors must be stacked over the same row blocks")
    out = torch.zeros(F1.rank, F2.rank, dtype=torch.float64, device=F1.device)
    for x, y in zip(b1, b2):
        if (isinstance(x, OuterProductFactor) and isinstance(y, OuterProductFactor)
                and x.T == 1 and y.T == 1):
            Ka = x.a[:, 0, :].double() @ y.a[:, 0, :].double().T
            Ke = x.e[:, 0, :].double() @ y.e[:, 0, :].double().T
            Ke.view(x.N, x.R, y.N, y.R).mul_(Ka[:, None, :, None])
            out += Ke
        elif isinstance(x, DenseFactor) and isinstance(y, DenseFactor):
            out += x.U.double().T @ y.U.double()
        else:
            out += to_float64(x).rmatmat(dense_columns(y, torch.float64))
    return out


def block_grams64(factor: LowRankFactor, R: int) -> Tensor:
    """Diagonal ``R × R`` blocks of ``Uᵀ U`` (consecutive column groups), float64 ``(M/R, R, R)``."""
    M = factor.rank
    if M % R:
        raise ValueError(f"rank {M} is not a multiple of R = {R}")
    n = M // R
    out = torch.zeros(n, R, R, dtype=torch.float64, device=factor.device)
    for b in _blocks(factor):
        if isinstance(b, OuterProductFactor) and b.T == 1 and b.R == R:
            aa = (b.a[:, 0, :].double() ** 2).sum(1)
            e = b.e[:, 0, :].double().reshape(n, R, b.d_out)
            out += aa[:, None, None] * (e @ e.transpose(1, 2))
        else:
            g = dense_columns(b, torch.float64).reshape(b.size, n, R)
            out += torch.einsum("pnr,pnq->nrq", g, g)
    return out



def rank_one_split(S: Tensor, rtol: float = 1e-12) -> tuple[Tensor, Tensor] | None:
    """``(r, c)`` with ``S = r cᵀ`` if the positive matrix ``S`` has rank one, else ``None``."""
    r = S[:, 0]
    c = S[0, :] / S[0, 0]
    if torch.allclose(torch.outer(r, c), S, rtol=rtol, atol=0.0):
        return r, c
    return None

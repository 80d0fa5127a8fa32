"""Gaussian precision ``Λ = diag(δ) + J Jᵀ``: exact sampling, log-determinant and variances.

This is the linear algebra behind the full-covariance Laplace posterior of Benzing (2022),
App. C.1 (math_spec §7). ``J ∈ R^{P×M}`` is never formed: the caller passes the *whitened*
factor ``V = diag(δ)^{-1/2} J`` as a :class:`~curvkit.linalg.LowRankFactor` (``Vᵀ X``, ``V W``
and the ``M × M`` Gram only). With the ``M × M`` core ``U_M = I_M + Vᵀ V`` (paper eqs 8, 9)::

    Λ⁻¹ = δ^{-1/2} (I_P + V Vᵀ)⁻¹ δ^{-1/2},   (I_P + V Vᵀ)⁻¹ = I_P − V U_M⁻¹ Vᵀ        (7)
    log det Λ = Σ_p log δ_p + log det U_M                                  (determinant lemma)

**Exact sampling** by the perturbation trick (paper eq 11; Hoffman & Ribak 1991)::

    y ∼ N(0, I_P),  z ∼ N(0, I_M),  x = y − V U_M⁻¹ (Vᵀ y + z),  θ − θ_MAP = δ^{-1/2} ⊙ x

``E[x xᵀ] = I − V U_M⁻¹ Vᵀ = (I + V Vᵀ)⁻¹``, so ``θ ∼ N(θ_MAP, Λ⁻¹)`` exactly. Memory
``O(P + M²)``; time ``O(M³)`` once plus ``O(M·P)`` per sample (for a layer factor of ``N``
inputs with ``R`` columns each, ``Vᵀ y`` and ``V w`` cost ``O(N·P)``).

**Quadratic forms** for a test factor ``V_t = δ^{-1/2} J_t`` (e.g. output Jacobians)::

    J_tᵀ Λ⁻¹ J_t = V_tᵀ V_t − Qᵀ U_M⁻¹ Q,   Q = Vᵀ V_t            (cᵀΛ⁻¹c = cᵀΛ_p⁻¹c − qᵀU⁻¹q)

**Routes.** ``"dual"`` factorises the ``M × M`` core (Cholesky, float64); ``"primal"`` forms
``I_P + V Vᵀ`` (``P × P``) instead, which is cheaper when ``P`` is small compared with ``M``
(e.g. logistic regression with the exact Fisher). ``"auto"`` compares flop counts (Gram +
factorisation) among the routes that fit in memory; for plain factors this is "primal iff
``P ≤ M``".

Helpers for layer factors (:class:`~curvkit.linalg.OuterProductFactor`) work in float64:
:func:`gram64`, :func:`cross_gram64`, :func:`block_grams64`, :func:`dense_columns`, and
:func:`softmax_null_basis` / :func:`reduce_softmax_errors`, which shrink the exact softmax Fisher
from ``C`` to ``C − 1`` columns per input without changing ``G Gᵀ``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.linalg.operator import LinearOperator, check_memory
from curvkit.linalg.outer import OuterProductFactor
from curvkit.linalg.woodbury import DenseFactor, LowRankFactor, StackedFactor

#: Peak bytes of one chunk of ``(P, k)`` intermediates (samples, columns).
CHUNK_BYTES = 2**28

__all__ = [
    "DiagonalPlusLowRank", "GemmOuterFactor", "ScaledFactor", "colmajor", "softmax_null_basis",
    "reduce_softmax_errors",
    "gram64", "outer_gram64", "cross_gram64", "block_grams64", "dense_columns", "to_float64", "gram_flops",
    "logdet_identity_plus", "rank_one_split",
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


# ====================================================================== factor helpers
class GemmOuterFactor(OuterProductFactor):
    """:class:`~curvkit.linalg.OuterProductFactor` whose dense-layer (``T = 1``) products are two
    plain GEMMs plus one batched GEMM over inputs, laid out for speed (same math)::

        (Uᵀ X)_{n r k} = Σ_o e_{n r o} (Σ_d a_{n d} V_{k o d})     V = mat_r(X_{:, k})
        (U W)_k        = Σ_n (Σ_r W_{n r k} e_{n r ·}) a_{n ·}ᵀ

    ``X`` should be column-major (see :func:`colmajor`); results are column-major ``(P, k)``.
    """

    def rmatmat(self, X: Tensor) -> Tensor:
        if self.T != 1:
            return super().rmatmat(X)
        k = X.shape[1]
        Vf = colmajor(X).T.reshape(k * self.d_out, self.d_in)
        VA = (self.a[:, 0, :] @ Vf.T).view(self.N, k, self.d_out)  # (n, k, o)
        e = self.e[:, 0, :].reshape(self.N, self.R, self.d_out)
        return torch.bmm(e, VA.transpose(1, 2)).reshape(self.rank, k)

    def matmat(self, W: Tensor) -> Tensor:
        if self.T != 1:
            return super().matmat(W)
        k = W.shape[1]
        Wr = W.reshape(self.N, self.R, k)
        e = self.e[:, 0, :].reshape(self.N, self.R, self.d_out)
        Ew = torch.bmm(Wr.transpose(1, 2), e)  # (n, k, o)
        out = Ew.reshape(self.N, k * self.d_out).T @ self.a[:, 0, :]  # (k·o, d)
        return out.reshape(k, self.size).T


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


def colmajor(X: Tensor) -> Tensor:
    """``X`` (``P × k``) with column-major storage (a transposed view of a contiguous ``k × P``).

    Layer factors reshape ``Xᵀ`` into ``(k, d_out, d_in)`` matrices; with this layout that is a
    view and the batched GEMM runs at full speed.
    """
    return X if X.dim() != 2 or X.stride(0) == 1 else X.T.contiguous().T


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


# ====================================================================== the precision operator
class DiagonalPlusLowRank(LinearOperator):
    """``Λ = diag(δ) + J Jᵀ`` (``P × P``, SPD) from ``δ > 0`` and ``V = diag(δ)^{-1/2} J``.

    Args:
        delta: ``(P,)`` positive diagonal ``δ`` (stored in float64).
        V: the whitened factor ``δ^{-1/2} J`` (``P × M``); vectors use its dtype.
        route: ``"dual"``, ``"primal"`` or ``"auto"`` (see module doc).
        block_shapes, name: see :class:`~curvkit.linalg.LinearOperator`.
        gram: optional precomputed ``VᵀV`` (dual) or ``VVᵀ`` (primal), e.g. a rescaled core
            after a change of a scalar ``δ``; needs an explicit ``route``.

    The factorisation (Cholesky of ``U_M = I + VᵀV`` or of ``I + VVᵀ``) happens in the
    constructor, in float64; ``U_M`` has eigenvalues ≥ 1, so it never fails for finite input.
    """

    def __init__(self, delta: Tensor, V: LowRankFactor, route: str = "auto",
                 block_shapes=None, name: str | None = None, gram: Tensor | None = None) -> None:
        if delta.dim() != 1 or delta.shape[0] != V.size:
            raise ValueError(f"delta must have shape ({V.size},), got {tuple(delta.shape)}")
        if not (torch.isfinite(delta).all() and (delta > 0).all()):
            raise ValueError("delta must be finite and positive")
        super().__init__(V.size, V.dtype, V.device, block_shapes, name or "DiagonalPlusLowRank")
        if route not in ("auto", "dual", "primal"):
            raise ValueError(f"route must be 'auto', 'dual' or 'primal', got {route!r}")
        self.delta = delta.to(device=V.device, dtype=torch.float64)
        self.V = V
        self.route = self.choose_route(V) if route == "auto" else route
        self.gram: Tensor | None = None  # K = VᵀV (dual) or VVᵀ (primal), float64
        if gram is not None:
            if route == "auto":
                raise ValueError("pass the route together with a precomputed gram")
            k = V.rank if self.route == "dual" else V.size
            if gram.shape != (k, k):
                raise ValueError(f"gram must be {k}×{k} for the {self.route} route, got {tuple(gram.shape)}")
            self.gram = gram.to(torch.float64)
        elif self.route == "dual":
            M = V.rank
            check_memory(3 * M * M * 8, f"the {M}×{M} Woodbury core of {self.name}", self.device)
            self.gram = gram64(V)
        else:
            self.gram = self._primal_matrix()
        S = self.gram.clone()
        S.diagonal().add_(1.0)
        L, info = torch.linalg.cholesky_ex(S)
        del S
        if int(info) != 0 or not torch.isfinite(L).all():
            raise FloatingPointError(f"{self.name}: the core I + K is not positive definite; the "
                                     "factor has non-finite or huge entries")
        self.chol = L

    # ------------------------------------------------------------------ route
    #: cost of one factorisation flop relative to one GEMM flop (CPU Cholesky runs at about half
    #: the GEMM rate); used by :meth:`route_costs`.
    FACTOR_FLOP_COST = 2.0

    @classmethod
    def route_costs(cls, V: LowRankFactor) -> dict[str, tuple[float, int]]:
        """``{route: (GEMM-equivalent flops, bytes)}`` of building and factorising each core.

        Dual: ``K = VᵀV`` (:func:`gram_flops`) + Cholesky ``M³/3``; primal: ``V Vᵀ`` (``2P²M``)
        + Cholesky ``P³/3``; factorisation flops weighted by :attr:`FACTOR_FLOP_COST`.
        """
        P, M = V.size, V.rank
        w = cls.FACTOR_FLOP_COST
        dual = (gram_flops(V) + w * M**3 / 3.0, 3 * M * M * 8)
        primal = (2.0 * P * P * M + w * P**3 / 3.0, 2 * P * P * 8 + min(P * M, 2**26) * 8)
        return {"dual": dual, "primal": primal}

    @classmethod
    def choose_route(cls, V: LowRankFactor) -> str:
        """The route with fewer flops among those that fit in memory."""
        from curvkit.linalg.operator import available_memory_bytes

        costs = cls.route_costs(V)
        free = 0.9 * available_memory_bytes(V.device)
        fits = {r: c for r, c in costs.items() if c[1] <= free}
        if not fits:
            gb = {r: f"{c[1] / 1e9:.1f} GB" for r, c in costs.items()}
            raise MemoryError(
                f"a Laplace posterior with P = {V.size} parameters and M = {V.rank} Fisher "
                f"columns needs {gb['dual']} (dual, M×M) or {gb['primal']} (primal, P×P) but only "
                f"{free / 0.9 / 1e9:.1f} GB is available; use a smaller Fisher batch, "
                "kind='mc', or structure='kfac', 'foof' or 'diag'"
            )
        return min(fits, key=lambda r: fits[r][0])

    def _primal_matrix(self) -> Tensor:
        """``V Vᵀ`` (``P × P``, float64)."""
        P = self.V.size
        check_memory(2 * P * P * 8, f"the {P}×{P} primal matrix of {self.name}", self.device)
        return outer_gram64(self.V)

    # ------------------------------------------------------------------ core pieces
    def _core_solve(self, B: Tensor) -> Tensor:
        """``U_M⁻¹ B`` (dual) or ``(I + VVᵀ)⁻¹ B`` (primal), float64 (two triangular solves)."""
        Y = torch.linalg.solve_triangular(self.chol, B.to(torch.float64), upper=False)
        return torch.linalg.solve_triangular(self.chol.mT, Y, upper=True)

    def core_logdet(self) -> Tensor:
        """``log det(I + VᵀV) = log det(I + VVᵀ)`` (float64)."""
        return 2.0 * self.chol.diagonal().log().sum()

    def _whitened_solve(self, Y: Tensor) -> Tensor:
        """``(I + VVᵀ)⁻¹ Y`` for ``Y`` of shape ``(P, k)``, float64."""
        Y = Y.to(torch.float64)
        if self.route == "primal":
            return self._core_solve(Y)
        V64 = self.V if self.V.dtype == torch.float64 else to_float64(self.V)
        return Y - V64.matmat(self._core_solve(V64.rmatmat(colmajor(Y))))

    # ------------------------------------------------------------------ contract
    def _matmat(self, X: Tensor) -> Tensor:
        s = self.delta.sqrt().to(X.dtype)[:, None]
        return self.delta.to(X.dtype)[:, None] * X + s * self.V.matmat(self.V.rmatmat(colmajor(s * X)))

    def _solve(self, X: Tensor, damping: float, damping_mode: str) -> Tensor:
        if damping != 0:
            raise NotImplementedError(
                f"{self.name} solves Λ x = v only (damping = 0); add the damping to δ instead")
        return self.solve64(X).to(X.dtype)

    def solve64(self, X: Tensor) -> Tensor:
        """``Λ⁻¹ X`` for ``X`` of shape ``(P, k)`` in any float dtype, computed and returned in float64."""
        r = self.delta.rsqrt()[:, None]
        return r * self._whitened_solve(r * X.to(torch.float64))

    def _logdet(self, damping: float) -> Tensor:
        if damping != 0:
            raise NotImplementedError(f"{self.name}.logdet supports damping = 0 only")
        return self.delta.log().sum() + self.core_logdet()

    def diagonal(self) -> Tensor:
        return (self.delta * (1.0 + self.V.sq_row_norms().to(torch.float64))).to(self.dtype)

    # ------------------------------------------------------------------ Gaussian N(0, Λ⁻¹)
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws from ``N(0, Λ⁻¹)`` as a ``(P, n)`` tensor (dtype of ``V``).

        Dual: the perturbation trick of the module doc. Primal: ``x = L⁻ᵀ y`` with
        ``L Lᵀ = I + VVᵀ``. Both return ``δ^{-1/2} ⊙ x``. Samples are drawn in chunks of columns
        so that intermediates stay below :data:`CHUNK_BYTES`.
        """
        P, M = self.V.size, self.V.rank
        item = torch.finfo(self.dtype).bits // 8
        check_memory(n * P * item, f"{n} samples of {P} parameters", self.device)
        out = torch.empty(n, P, dtype=self.dtype, device=self.device)  # returned transposed
        step = max(1, CHUNK_BYTES // max(1, 3 * P * 8))
        rdelta = self.delta.rsqrt().to(self.dtype)
        for j in range(0, n, step):
            k = min(step, n - j)
            y = torch.randn(k, P, dtype=self.dtype, device=self.device, generator=generator).T
            if self.route == "primal":
                x = torch.linalg.solve_triangular(self.chol.T, y.to(torch.float64), upper=True)
                out[j:j + k] = x.T.to(self.dtype) * rdelta
            else:
                z = torch.randn(M, k, dtype=torch.float64, device=self.device, generator=generator)
                w = self._core_solve(self.V.rmatmat(y).to(torch.float64) + z)
                x = y - self.V.matmat(w.to(self.dtype))
                out[j:j + k] = x.T * rdelta
        return out.T

    def inverse_diagonal(self) -> Tensor:
        """``diag(Λ⁻¹) = δ⁻¹ ⊙ diag((I + VVᵀ)⁻¹)`` (float64, ``(P,)``).

        Dual: ``diag(I − V U_M⁻¹ Vᵀ) = 1 − rownorms²(V L⁻ᵀ)``, with ``V L⁻ᵀ`` formed in column
        chunks (time ``O(M·N·P)`` for layer factors, memory ``O(P·chunk)``).
        Primal: ``diag((L Lᵀ)⁻¹) = colnorms²(L⁻¹)``.
        """
        L = self.chol
        eye = torch.eye(L.shape[0], dtype=torch.float64, device=self.device)
        if self.route == "primal":
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            return (Linv**2).sum(0) / self.delta
        LinvT = torch.linalg.solve_triangular(L.T, eye, upper=True)  # L⁻ᵀ, (M, M)
        V64 = to_float64(self.V)
        acc = torch.zeros(self.V.size, dtype=torch.float64, device=self.device)
        step = max(1, CHUNK_BYTES // max(1, 2 * 8 * self.V.size))
        for j in range(0, L.shape[0], step):
            acc += (V64.matmat(LinvT[:, j:j + step]) ** 2).sum(1)
        return (1.0 - acc) / self.delta

    def inverse_quad_blocks(self, Vt: LowRankFactor, R: int) -> Tensor:
        """Per-group ``R × R`` blocks of ``J_tᵀ Λ⁻¹ J_t`` given ``V_t = δ^{-1/2} J_t`` (float64).

        Dual: ``V_tᵀV_t − Qᵀ U_M⁻¹ Q`` with ``Q = VᵀV_t`` (no ``P``-sized intermediates for dense
        layers). Primal: ``‖L⁻¹ V_t‖²`` blocks. Returns ``(M_t/R, R, R)``.
        """
        n = Vt.rank // R
        if self.route == "primal":
            X = dense_columns(Vt, torch.float64)
            Z = torch.linalg.solve_triangular(self.chol, X, upper=False).reshape(-1, n, R)
            return torch.einsum("pnr,pnq->nrq", Z, Z)
        Q = cross_gram64(self.V, Vt)
        W = self._core_solve(Q)
        corr = torch.einsum("mnr,mnq->nrq", Q.reshape(-1, n, R), W.reshape(-1, n, R))
        return block_grams64(Vt, R) - corr

    def core_eigenvalues(self) -> Tensor:
        """Eigenvalues of ``VᵀV`` (dual, ``M``) or ``VVᵀ`` (primal, ``P``), float64, ascending."""
        return torch.linalg.eigvalsh(self.gram).clamp_min(0.0)


def logdet_identity_plus(eigenvalues: Tensor, scale: Tensor | float) -> Tensor:
    """``Σ_i log(1 + s_i / δ)`` (``log det(I + K/δ)`` from the eigenvalues ``s`` of ``K``)."""
    return torch.log1p(eigenvalues / scale).sum()


def rank_one_split(S: Tensor, rtol: float = 1e-12) -> tuple[Tensor, Tensor] | None:
    """``(r, c)`` with ``S = r cᵀ`` if the positive matrix ``S`` has rank one, else ``None``."""
    r = S[:, 0]
    c = S[0, :] / S[0, 0]
    if torch.allclose(torch.outer(r, c), S, rtol=rtol, atol=0.0):
        return r, c
    return None

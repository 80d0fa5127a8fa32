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

The float64 Gram helpers on layer factors live in :mod:`curvkit.linalg.factor_ops`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.linalg.factor_ops import (
    CHUNK_BYTES,
    block_grams64,
    colmajor,
    cross_gram64,
    dense_columns,
    gram64,
    gram_flops,
    outer_gram64,
    to_float64,
)
from curvkit.linalg.operator import LinearOperator, check_memory
from curvkit.linalg.woodbury import LowRankFactor

__all__ = ["DiagonalPlusLowRank", "logdet_identity_plus"]


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

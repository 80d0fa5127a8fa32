"""Low-rank operators ``A = U Uᵀ`` and their damped inverse by the Woodbury identity.

``U ∈ R^{P×M}`` is never materialised: a :class:`LowRankFactor` gives only ``Uᵀ X``, ``U W`` and
the ``M × M`` Gram ``K = Uᵀ U``. With ``λ > 0`` (Benzing 2022, App. I, eqs 19–20)::

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
limit plus ≈ ``c·2⁻⁵³·σ²_max/λ`` (float64 solves: ≈ 1e-11 on the problem above). Layer factors
convert ``v`` in row chunks, so no ``P``-sized float64 temporary is allocated.
Splitting off the span component does not avoid the float64 products:
``v − U w = (v − U K⁻¹u) + U(K⁻¹u − w)`` makes the second term cancellation-free
(``K⁻¹u − w = λ K⁻¹(λI + K)⁻¹ u``), but the first is the same cancellation, and the span part of
its error is again multiplied by ``σ²_max/λ`` in the residual.

**Cost.** The two ``P``-sized products take ``2·N·P`` flops each for a dense layer with ``R = 1``
(``2·N·P + 2·M·d_out`` with ``R`` columns per input), i.e. ``4·N·P`` per right-hand side, plus
``2M²`` in the core. A float64 FMA does half the work of a float32 one on SIMD CPUs (4 vs 8 lanes
with AVX2), so once these GEMMs dominate (``N ≳ 100`` at ``P = 2.79M``) the float64-accumulated
solve takes about twice the float32-product formula: measured 1.35×, 2.0×, 2.1× at N = 32, 100,
300 (one thread, thread time), float64 GEMMs at 16–28 GFlop/s against 21–59 GFlop/s in float32.

**Diagonal damping and the Gaussian methods** (the Laplace precision ``Λ = U Uᵀ + D``, Benzing 2022,
App. C.1, eqs 7–11). Every damped inverse is written as ``(A + D)⁻¹ = R (I − V Ĉ⁻¹ Vᵀ) R`` with

* scalar ``λ``: ``R = λ^{-1/2}``, ``V = U``, ``Ĉ = λ I_M + K`` (the factorisation above), ``c = λ``;
* diagonal ``D``: ``R = D^{-1/2}``, ``V = D^{-1/2} U`` (:meth:`LowRankFactor.whiten`; the Hadamard
  trick survives a damping constant per weight/bias tensor), ``Ĉ = I_M + VᵀV``, ``c = 1``.

Then (``y ∼ N(0, I_P)``, ``z ∼ N(0, I_M)``; the perturbation trick of eq 11)::

    log det(A + D) = −2 log det R + log det Ĉ − M log c
    x = y − V Ĉ⁻¹ (Vᵀ y + √c z),   R x ∼ N(0, (A + D)⁻¹)          (E[x xᵀ] = I − V Ĉ⁻¹ Vᵀ)
    diag((A + D)⁻¹) = R² (1 − rownorms²(V L⁻ᵀ)),   Ĉ = L Lᵀ
    Jᵀ (A + D)⁻¹ J = (R J)ᵀ (R J) − Qᵀ Ĉ⁻¹ Q,   Q = Vᵀ (R J)

(no ``P × P`` matrix; test Jacobian factors ``J`` of dense layers enter through Grams only). In a
draw ``y − V w`` cancels along the top posterior directions (``x`` there is ``O(√c/σ)``, ``y`` is
``O(1)``), so as in the solve both products are float64 GEMMs: the float32 ``y`` is widened once
per layer block into a float64 working copy (:meth:`LowRankFactor.block64`), ``Vᵀy`` and
``y − V w`` run on it and ``x`` is rounded once. The float32 draw is then the exact draw of the
same ``y, z`` rounded once (``Vᵀ`` of its error is the float32 representation limit); with
float32 products it is 7–21× that limit on the MLPs of ``benchmarks/laplace.py``. The primal
route factorises ``U Uᵀ + D`` itself. The eigenvalues of ``U Uᵀ`` come from the smaller
of ``K`` and ``U Uᵀ``.

Route ``"cost"`` picks, among the routes that fit in memory, the one with fewer flops to build and
factorise its core (:meth:`Woodbury.route_costs`); ``"auto"`` is "primal iff ``P ≤ M``".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from typing_extensions import override

from curvkit.linalg.cholesky import SPDFactor, damped_cholesky
from curvkit.linalg.finite import all_finite
from curvkit.linalg.lowrank import (
    CHUNK_BYTES,
    DenseFactor,
    LowRankFactor,
    StackedFactor,
    column_group_grams,
)
from curvkit.linalg.memory import available_memory_bytes, check_memory, scratch
from curvkit.linalg.operator import Damping, LinearOperator
from curvkit.linalg.outer import colmajor

__all__ = ["Woodbury", "LowRankFactor", "DenseFactor", "StackedFactor"]


class Woodbury(LinearOperator):
    """``A = U Uᵀ`` (``P × P``, rank ≤ M) with Woodbury solves through the ``M × M`` core.

    Args:
        factor: the low-rank factor ``U``.
        route: ``"dual"`` (``M × M`` system), ``"primal"`` (form ``U Uᵀ``), ``"auto"``
            (primal when ``P ≤ M``) or ``"cost"`` (fewer flops among the routes that fit).
        block_shapes, name: see :class:`~curvkit.linalg.operator.LinearOperator`.
    """

    def __init__(self, factor: LowRankFactor, route: str = "auto", block_shapes=None,
                 name: str | None = None) -> None:
        super().__init__(factor.size, factor.dtype, factor.device, block_shapes, name=name)
        if route not in ("auto", "dual", "primal", "cost"):
            raise ValueError(f"route must be 'auto', 'dual' or 'primal' (or 'cost'), got {route!r}")
        if route == "auto":
            route = "primal" if factor.size <= factor.rank else "dual"
        elif route == "cost":
            route = self.choose_route(factor)
        self.factor, self.route = factor, route
        self._gram: Tensor | None = None
        self._dense: Tensor | None = None
        self._chol: dict[float, SPDFactor] = {}
        self._diag_core: tuple[Tensor, tuple] | None = None

    # ------------------------------------------------------------------ pieces
    @property
    def rank(self) -> int:
        """``M``, the number of columns of ``U``."""
        return self.factor.rank

    def gram(self) -> Tensor:
        """``K = Uᵀ U`` in float64 (cached)."""
        if self._gram is None:
            M = self.factor.rank
            check_memory(3 * M * M * 8, f"the {M}×{M} Gram of {self.name}", self.device)
            K = self.factor.gram64()
            if not all_finite(K):
                raise FloatingPointError(f"{self.name}: the Gram matrix has non-finite entries")
            # symmetric to float64 round-off by construction; the Cholesky and eigvalsh read only
            # its lower triangle, so no (K + Kᵀ)/2 pass over the M×M matrix (strided, memory-bound)
            self._gram = K
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
            if not all_finite(self._dense):
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

    def _solve(self, X: Tensor, damping: Damping, damping_mode: str) -> Tensor:
        """``(UUᵀ + λI)⁻¹ X``; dual: ``x = (X − U w)/λ``, products accumulated in float64 (module doc)."""
        if isinstance(damping, Tensor):
            return self._whitened_solve(X, damping).to(X.dtype)
        fac = self._factorize(damping)
        if self.route == "primal":
            return self._apply_inv(fac, X.to(torch.float64)).to(X.dtype)
        w = self._apply_inv(fac, self.factor.rmatmat64(X))
        return self.factor.sub_matmat64(X, w, 1.0 / damping)

    def _logdet(self, damping: Damping) -> Tensor:
        if isinstance(damping, Tensor):
            R, _, fac, _ = self._core(damping)
            return fac.logdet() if self.route == "primal" else fac.logdet() - 2 * R.log().sum()
        ld = self._factorize(damping).logdet()
        if self.route == "dual":
            ld = ld + (self.factor.size - self.factor.rank) * math.log(damping)
        return ld

    @override
    def diagonal(self) -> Tensor:
        return self.factor.sq_row_norms()

    @override
    def to_dense(self) -> Tensor:
        if self.route == "primal":
            return self.dense64().to(self.dtype)
        return super().to_dense()

    # ------------------------------------------------------------------ route by cost
    #: cost of one factorisation flop relative to one GEMM flop (CPU Cholesky runs at about half
    #: the GEMM rate).
    FACTOR_FLOP_COST = 2.0

    @classmethod
    def route_costs(cls, factor: LowRankFactor) -> dict[str, tuple[float, int]]:
        """``{route: (GEMM-equivalent flops, bytes)}`` of building and factorising each core.

        Dual: ``K = UᵀU`` (:meth:`LowRankFactor.gram_flops`) + Cholesky ``M³/3``; primal:
        ``U Uᵀ`` (``2P²M``) + Cholesky ``P³/3``; factorisation flops weighted by
        :attr:`FACTOR_FLOP_COST`.
        """
        P, M, w = factor.size, factor.rank, cls.FACTOR_FLOP_COST
        dual = (factor.gram_flops() + w * M**3 / 3.0, 3 * M * M * 8)
        primal = (2.0 * P * P * M + w * P**3 / 3.0, 2 * P * P * 8 + min(P * M, 2**26) * 8)
        return {"dual": dual, "primal": primal}

    @classmethod
    def choose_route(cls, factor: LowRankFactor) -> str:
        """The route with fewer flops among those that fit in memory (``MemoryError`` if none)."""
        costs = cls.route_costs(factor)
        free = 0.9 * available_memory_bytes(factor.device)
        fits = {r: c for r, c in costs.items() if c[1] <= free}
        if not fits:
            gb = {r: f"{c[1] / 1e9:.1f} GB" for r, c in costs.items()}
            raise MemoryError(
                f"a Woodbury operator with P = {factor.size} parameters and M = {factor.rank} "
                f"columns needs {gb['dual']} (dual, M×M) or {gb['primal']} (primal, P×P) but only "
                f"{free / 0.9 / 1e9:.1f} GB is available; use a smaller Fisher batch, kind='mc', or "
                "structure='kfac', 'foof' or 'diag'")
        return min(fits, key=lambda r: fits[r][0])

    # ------------------------------------------------------------------ Gaussian methods
    def _core(self, damping: Damping) -> tuple:
        """``(R, V, Ĉ, c)`` of the module doc (primal: ``(R, None, factor of UUᵀ + D, 1)``)."""
        if not isinstance(damping, Tensor):
            V = None if self.route == "primal" else self.factor
            return torch.tensor(damping, dtype=torch.float64).rsqrt(), V, self._factorize(damping), damping
        if self._diag_core is not None and torch.equal(self._diag_core[0], damping):
            return self._diag_core[1]
        if bool((damping <= 0).any()):
            raise ValueError(f"{self.name}: a per-parameter damping must be > 0 everywhere "
                             "(U Uᵀ is singular)")
        R = damping.rsqrt()
        core: tuple
        if self.route == "primal":
            core = (R, None, damped_cholesky(self.dense64(), damping, name=self.name), 1.0)
        else:
            M = self.factor.rank
            V = self.factor.whiten(R)
            check_memory(3 * M * M * 8, f"the {M}×{M} Woodbury core of {self.name}", self.device)
            K = V.gram64()
            K.diagonal().add_(1.0)
            core = (R, V, damped_cholesky(K, 0.0, name=f"{self.name} (whitened core)",
                                          symmetrize=False), 1.0)
        self._diag_core = (damping, core)
        return core

    def _whitened_solve(self, X: Tensor, damping: Tensor) -> Tensor:
        """``R (I − V Ĉ⁻¹ Vᵀ) R X`` (dual) or ``(UUᵀ + D)⁻¹ X`` (primal), float64."""
        R, V, fac, _ = self._core(damping)
        if V is None:
            return fac.solve(X)
        V64 = V.to64()
        Y = R[:, None] * X.to(torch.float64)
        return R[:, None] * (Y - V64.matmat(fac.solve(V64.rmatmat(colmajor(Y)))))

    def _sample(self, k: int, damping: Damping, generator: torch.Generator | None) -> Tensor:
        R, V, fac, c = self._core(damping)
        P, M = self.shape[0], self.factor.rank
        out = torch.empty(k, P, dtype=self.dtype, device=self.device)  # returned transposed
        step = max(1, CHUNK_BYTES // max(1, 3 * P * 8))
        if V is None:
            for j in range(0, k, step):
                kk = min(step, k - j)
                y = torch.randn(kk, P, dtype=self.dtype, device=self.device, generator=generator).T
                out[j:j + kk] = fac.inv_sqrt(y).T.to(self.dtype)
            return out.T
        blocks = V.row_blocks()
        bounds = [0]
        for b in blocks:
            bounds.append(bounds[-1] + b.size)
        r = R.to(self.device, torch.float64) if R.dim() else None
        scale = 1.0 if r is not None else float(R)
        for j in range(0, k, step):
            kk = min(step, k - j)
            y = torch.randn(kk, P, dtype=self.dtype, device=self.device, generator=generator)
            z = torch.randn(M, kk, dtype=torch.float64, device=self.device, generator=generator)
            # y − V w nearly cancels along the top posterior directions: float64 accumulation,
            # one rounding (the same care as the dual solve; module doc). y is widened once per
            # parameter block into a float64 working copy (LowRankFactor.block64), on which both
            # products are plain float64 GEMMs and y − V w is accumulated in place.
            work = scratch("woodbury.draws", (kk * P,), torch.float64, self.device)
            ys = [b.block64(y[:, lo:hi], work[kk * lo:kk * hi])
                  for b, lo, hi in zip(blocks, bounds[:-1], bounds[1:])]
            u = math.sqrt(c) * z
            for b, yb in zip(blocks, ys):
                u += b.block_rmatmat64(yb)
            w = fac.solve(u)
            for b, yb, lo, hi in zip(blocks, ys, bounds[:-1], bounds[1:]):
                b.block_sub_matmat64_(yb, w, scale)
                b.block_store(yb, out[j:j + kk, lo:hi], None if r is None else r[lo:hi])
        return out.T

    def _inverse_diagonal(self, damping: Damping) -> Tensor:
        R, V, fac, _ = self._core(damping)
        if V is None:
            return fac.inverse_diagonal()
        M = self.factor.rank
        RT = fac.inv_sqrt(torch.eye(M, dtype=torch.float64, device=self.device))  # R Rᵀ = Ĉ⁻¹
        V64 = V.to64()
        acc = torch.zeros(self.shape[0], dtype=torch.float64, device=self.device)
        step = max(1, CHUNK_BYTES // max(1, 2 * 8 * self.shape[0]))
        for j in range(0, M, step):
            acc += (V64.matmat(RT[:, j:j + step]) ** 2).sum(1)
        return R**2 * (1.0 - acc)

    def _inverse_quad_blocks(self, J: LowRankFactor, R: int, damping: Damping) -> Tensor:
        Rs, V, fac, _ = self._core(damping)
        if V is None:
            return column_group_grams(fac.half_solve(J.dense(torch.float64)), R)
        Jw = J.whiten(Rs) if Rs.dim() else J
        Q = V.cross_gram64(Jw)
        n = J.rank // R
        corr = torch.einsum("mnr,mnq->nrq", Q.reshape(-1, n, R), fac.solve(Q).reshape(-1, n, R))
        out = Jw.block_grams64(R) - corr
        return out if Rs.dim() else out * float(Rs) ** 2

    def _eigenvalues(self) -> Tensor:
        """Eigenvalues of ``K`` (``M ≤ P``) or of ``U Uᵀ`` (float64, ≥ 0)."""
        S = self.gram() if self.factor.rank <= self.factor.size else self.dense64()
        return torch.linalg.eigvalsh(S).clamp_min(0.0)

    def _logdet_function(self, group_sizes: list[int] | None) -> Callable[[Tensor], Tensor]:
        """``t ↦ log det(A + diag(e^{t_g}))`` over damping groups ``g``.

        One group: from :meth:`eigenvalues`. Several groups: dual
        ``Σ_g P_g t_g + log det(I_M + Σ_g e^{−t_g} U_gᵀ U_g)``; primal
        ``Σ_g P_g t_g + log det(I_P + T^{-1/2} U Uᵀ T^{-1/2})``; one Cholesky per call.
        """
        if group_sizes is None or len(group_sizes) == 1:
            return super()._logdet_function(None)
        sizes = torch.tensor(group_sizes, dtype=torch.float64, device=self.device)
        if self.route == "dual":
            M = self.factor.rank
            check_memory((len(group_sizes) + 2) * M * M * 8,
                         f"{len(group_sizes)} per-group {M}×{M} Grams of {self.name}", self.device)
            rows = self.factor.row_blocks()
            if [b.size for b in rows] != list(group_sizes):
                U = self.factor.dense(torch.float64)
                rows = [DenseFactor(u) for u in U.split(group_sizes)]
            grams = torch.stack([b.gram64() for b in rows])
            eye = torch.eye(M, dtype=torch.float64, device=self.device)

            def fn(t: Tensor) -> Tensor:
                K = eye + torch.einsum("l,lij->ij", torch.exp(-t), grams)
                return (sizes * t).sum() + 2.0 * torch.linalg.cholesky(K).diagonal().log().sum()

            return fn
        UU = self.dense64()
        eye = torch.eye(self.shape[0], dtype=torch.float64, device=self.device)
        counts = torch.tensor(group_sizes, device=self.device)

        def fn_primal(t: Tensor) -> Tensor:
            r = torch.repeat_interleave(torch.exp(-0.5 * t), counts)
            S = eye + r[:, None] * UU * r[None, :]
            return (sizes * t).sum() + 2.0 * torch.linalg.cholesky(S).diagonal().log().sum()

        return fn_primal

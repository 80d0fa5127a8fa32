"""Kronecker-factored operator ``B ⊗ A`` acting on row-major ``vec_r(V)``, ``V ∈ R^{d_out×d_in}``.

With row-major vectorisation ``(B ⊗ A) vec_r(V) = vec_r(B V A)`` for symmetric ``A``, ``B``
(Benzing 2022, Sec. 2 notation). Two damped inverses (Sec. 2, eqs 2–4; standard damping as in
footnote 2):

* ``"exact"`` (standard damping): ``(B ⊗ A + λI)⁻¹``, via eigendecompositions
  ``A = U_A diag(s_A) U_Aᵀ``, ``B = U_B diag(s_B) U_Bᵀ``::

      V ↦ U_B [ (U_Bᵀ V U_A) ⊘ (s_B s_Aᵀ + λ) ] U_Aᵀ

  (the public reference code transposes the B-side eigenbasis; this is the corrected formula).
* ``"heuristic"`` (factored Tikhonov): ``((B + λ_B I) ⊗ (A + λ_A I))⁻¹``::

      V ↦ (B + λ_B I)⁻¹ V (A + λ_A I)⁻¹,   λ_A = π√λ,  λ_B = √λ/π,
      π = sqrt( (tr A / d_in) / (tr B / d_out) )

  with the guard ``π = 1`` when ``π`` is not finite or not positive (e.g. a zero factor).

``B = None`` stands for the identity (FOOF: ``I ⊗ Â``, i.e. ``V ↦ V Â``; its exact damped inverse
is ``V ↦ V (Â + λI)⁻¹``, one Cholesky).

**Factorisations.** :meth:`Kronecker.factorize` returns a
:class:`~curvkit.linalg.kronecker_inverse.KroneckerInverse` holding the factorised damped inverse
(the optimizers keep it between inversions); each damped side ``(S + λI)⁻¹`` is the
``cholesky_inverse`` of one Cholesky factor or, when it is applied rarely (the optimizers pass
their inversion period), that Cholesky factor itself, never a solve against the identity; float32
only where the damped factor is well conditioned. The cost and dtype rules are stated in
:mod:`curvkit.linalg.kronecker_inverse`. Eigendecompositions (exact mode with a
``B``) are float64; when LAPACK's ``eigh`` does not converge (seen on rank-deficient float32
factors with many zero rows), a trace-scaled shift ``τ = 10⁻¹²·tr(S)/n`` and then scipy's ``evr``
driver are tried, with a ``RuntimeWarning`` once per factor name.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, cast

import torch
from torch import Tensor
from typing_extensions import override

from curvkit.linalg.finite import all_finite
from curvkit.linalg.kronecker_inverse import (  # noqa: F401  (re-exported: the inversion rules)
    FLOAT32_MAX_COND,
    KroneckerInverse,
    damped_inverse,
    damped_side,
    factorisation_dtype,
)
from curvkit.linalg.operator import Damping, LinearOperator, SingularError

#: what to do instead of a per-parameter damping on a Kronecker block.
_KRON_ALTERNATIVE = ("pass one damping per Kronecker block (a scalar, or a (P,) tensor constant on "
                     "each layer), or use structure='full' or 'diag' for per-parameter damping")

_WARNED: set[str] = set()


def pi_damping(A: Tensor, B: Tensor | None, damping: float) -> tuple[float, float]:
    """``(λ_A, λ_B)`` of the π rule: ``λ_A λ_B = λ`` and ``λ_A/λ_B = d_out tr A /(d_in tr B)``.

    ``B = None`` is the identity. Falls back to ``λ_A = λ_B = √λ`` when π is not finite or ≤ 0.
    """
    root = math.sqrt(damping)
    tr_a = float(A.diagonal().sum()) / A.shape[0]
    tr_b = 1.0 if B is None else float(B.diagonal().sum()) / B.shape[0]
    pi = math.sqrt(tr_a / tr_b) if tr_b > 0 and tr_a >= 0 else math.nan
    if not math.isfinite(pi) or pi <= 0:
        pi = 1.0
    return pi * root, root / pi


def _warn_once(name: str, message: str) -> None:
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _sym_eigh(S: Tensor, name: str = "factor") -> tuple[Tensor, Tensor]:
    """Eigendecomposition of the symmetrised ``S`` in float64 (eigenvalues clamped at 0).

    With the fallbacks of the module doc when LAPACK does not converge.
    """
    S = S.to(torch.float64)
    S = 0.5 * (S + S.T)
    try:
        s, U = torch.linalg.eigh(S)
    except torch.linalg.LinAlgError:
        n = S.shape[0]
        tau = 1e-12 * max(float(S.diagonal().sum()) / max(n, 1), torch.finfo(torch.float64).tiny)
        try:
            s, U = torch.linalg.eigh(S + tau * torch.eye(n, dtype=S.dtype, device=S.device))
            s = s - tau
            how = f"the trace-scaled shift τ = {tau:.3g}"
        except torch.linalg.LinAlgError:
            import scipy.linalg

            w, V = scipy.linalg.eigh(S.cpu().numpy(), driver="evr")
            s, U = torch.from_numpy(w).to(S.device), torch.from_numpy(V).to(S.device)
            how = "scipy's 'evr' driver"
        _warn_once(name, f"{name}: torch.linalg.eigh did not converge (ill-conditioned factor); "
                         f"eigendecomposition computed with {how}")
    return s.clamp_min(0.0), U


class Kronecker(LinearOperator):
    """``B ⊗ A`` (row-major), ``A ∈ R^{d_in×d_in}``, ``B ∈ R^{d_out×d_out}`` (``None`` = ``I``).

    Args:
        B: output-side factor (e.g. KFAC's ``B̂ = (1/N) Σ e eᵀ``), or ``None`` for the identity.
        A: input-side factor (e.g. ``Â = (1/N) Σ a aᵀ``).
        d_out: needed when ``B`` is ``None``.
    """

    damping_modes = ("exact", "heuristic")

    def __init__(self, B: Tensor | None, A: Tensor, d_out: int | None = None, name: str | None = None):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A must be square, got shape {tuple(A.shape)}")
        if B is not None and (B.dim() != 2 or B.shape[0] != B.shape[1]):
            raise ValueError(f"B must be square, got shape {tuple(B.shape)}")
        if B is None and d_out is None:
            raise ValueError("pass d_out when B is None (identity)")
        for nm, F in (("A", A), ("B", B)):
            if F is not None and not all_finite(F):
                raise FloatingPointError(f"{name or 'Kronecker'}: factor {nm} has non-finite entries")
        self.A, self.B = A, B
        self.d_in = A.shape[0]
        self.d_out = B.shape[0] if B is not None else int(cast(int, d_out))  # checked above
        super().__init__(self.d_out * self.d_in, A.dtype, A.device, name=name or "Kronecker")
        self._eig: tuple | None = None
        self._heur: dict[tuple, tuple[Tensor | None, Tensor]] = {}

    # ------------------------------------------------------------------ pieces
    def eig(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(s_A, U_A, s_B, U_B)`` in float64 (``None`` for an identity ``B``); cached."""
        if self._eig is None:
            sA, UA = _sym_eigh(self.A, f"{self.name}.A")
            sB, UB = _sym_eigh(self.B, f"{self.name}.B") if self.B is not None else (None, None)
            self._eig = (sA, UA, sB, UB)
        return self._eig

    def factorize(self, damping: float, damping_mode: str = "exact",  # type: ignore[override]  # own object
                  dtype: torch.dtype | None = None, allow_float32: bool = False,
                  uses: int | None = None) -> KroneckerInverse:
        """The factorised damped inverse (module doc), its tensors in ``dtype`` (default float64).

        Args:
            damping: ``λ > 0``.
            damping_mode: ``"exact"`` (standard damping) or ``"heuristic"``.
            dtype: dtype of the held inverses and eigendecompositions (a held Cholesky factor
                keeps its factorisation dtype).
            allow_float32: Cholesky factorisations of float32 factors may run in float32 where
                the dtype rule of :mod:`~curvkit.linalg.kronecker_inverse` says it is safe (the
                optimizers); eigendecompositions are always float64.
            uses: how often the result will be applied (the optimizers' inversion period);
                damped sides applied rarely enough keep their Cholesky factor instead of the
                inverse (:func:`~curvkit.linalg.kronecker_inverse.holds_factor`). ``None``:
                always the inverses.

        Returns:
            A :class:`KroneckerInverse`.
        """
        if damping_mode not in self.damping_modes:
            raise ValueError(f"unknown damping_mode {damping_mode!r}; valid: {list(self.damping_modes)}")
        dt = torch.float64 if dtype is None else dtype
        lam_a, lam_b = self.damping_split(damping)
        if damping_mode == "heuristic" or self.B is None:
            if damping_mode == "heuristic" and uses is None:
                Bh, Ah = self.heuristic_inverses(damping, dt, allow_float32)
                return KroneckerInverse(damping_mode, damping, lam_a, lam_b, A_inv=Ah, B_inv=Bh)
            # exact mode with B = I: (I ⊗ A + λI)⁻¹ = I ⊗ (A + λI)⁻¹
            side_a = lam_a if damping_mode == "heuristic" else damping
            opts: dict[str, Any] = dict(uses=uses, dtype=dt, allow_float32=allow_float32)
            Ai, Ac = damped_side(self.A, side_a, k=self.d_out, name=f"{self.name}.A", **opts)
            Bi = Bc = None
            if damping_mode == "heuristic" and self.B is not None:
                Bi, Bc = damped_side(self.B, lam_b, k=self.d_in, name=f"{self.name}.B", **opts)
            return KroneckerInverse(damping_mode, damping, lam_a, lam_b, A_inv=Ai, B_inv=Bi,
                                    A_chol=Ac, B_chol=Bc)
        sA, UA, sB, UB = self.eig()
        if sB is None or UB is None:  # B is not None here
            raise RuntimeError(f"{self.name}: the eigendecomposition of B is missing")
        return KroneckerInverse("exact", damping, lam_a, lam_b, s_A=sA.to(dt), U_A=UA.to(dt),
                                s_B=sB.to(dt), U_B=UB.to(dt))

    def damping_split(self, damping: float) -> tuple[float, float]:
        """``(λ_A, λ_B)`` of the heuristic (π) damping."""
        return pi_damping(self.A, self.B, damping)

    def heuristic_inverses(self, damping: float, dtype: torch.dtype = torch.float64,
                           allow_float32: bool = False) -> tuple[Tensor | None, Tensor]:
        """``((B + λ_B I)⁻¹, (A + λ_A I)⁻¹)`` in ``dtype`` (first is ``None`` for ``B = I``).

        :func:`damped_inverse` each, cached per ``(λ, dtype, allow_float32)``.
        """
        key = (damping, dtype, allow_float32)
        if key not in self._heur:
            lam_a, lam_b = self.damping_split(damping)
            Ai = damped_inverse(self.A, lam_a, name=f"{self.name}.A", dtype=dtype,
                                allow_float32=allow_float32)
            Bi = damped_inverse(self.B, lam_b, name=f"{self.name}.B", dtype=dtype,
                                allow_float32=allow_float32) if self.B is not None else None
            if len(self._heur) > 4:
                self._heur.clear()
            self._heur[key] = (Bi, Ai)
        return self._heur[key]

    def damped_dense(self, damping: float, damping_mode: str = "exact") -> Tensor:
        """The damped matrix itself (paper eqs 3–4): ``B⊗A + λI`` or ``(B+λ_B I)⊗(A+λ_A I)``."""
        B = self.B if self.B is not None else torch.eye(self.d_out, dtype=self.dtype, device=self.device)
        I_a = torch.eye(self.d_in, dtype=self.dtype, device=self.device)
        if damping_mode == "exact":
            return torch.kron(B, self.A) + damping * torch.eye(self.shape[0], dtype=self.dtype,
                                                               device=self.device)
        lam_a, lam_b = self.damping_split(damping)
        I_b = torch.eye(self.d_out, dtype=self.dtype, device=self.device)
        return torch.kron(B + lam_b * I_b, self.A + lam_a * I_a)

    # ------------------------------------------------------------------ matrix-form products
    def matmul_matrix(self, V: Tensor) -> Tensor:
        """``B V A`` for ``V`` of shape ``(..., d_out, d_in)``."""
        out = V @ self.A
        return out if self.B is None else self.B @ out

    def solve_matrix(self, V: Tensor, damping: float, damping_mode: str = "exact") -> Tensor:
        """Damped inverse applied to ``V`` of shape ``(..., d_out, d_in)`` (see module doc)."""
        dt = V.dtype
        V64 = V.to(torch.float64)
        if damping_mode == "heuristic":
            Bi, Ai = self.heuristic_inverses(damping)
            out = V64 @ Ai
            return (out if Bi is None else Bi @ out).to(dt)
        if damping_mode != "exact":
            raise ValueError(f"unknown damping_mode {damping_mode!r}; valid: {list(self.damping_modes)}")
        sA, UA, sB, UB = self.eig()
        if UB is None or sB is None:  # both None exactly for B = I
            denom = sA + damping
            if (denom <= 0).any():
                raise SingularError(f"{self.name} + {damping}·I is singular; pass damping > 0")
            return (((V64 @ UA) / denom) @ UA.T).to(dt)
        denom = sB[:, None] * sA[None, :] + damping
        if (denom <= 0).any():
            raise SingularError(f"{self.name} + {damping}·I is singular; pass damping > 0")
        return (UB @ ((UB.T @ V64 @ UA) / denom) @ UA.T).to(dt)

    # ------------------------------------------------------------------ contract
    def _to_mats(self, X: Tensor) -> Tensor:
        return X.T.reshape(X.shape[1], self.d_out, self.d_in)

    def _from_mats(self, Y: Tensor) -> Tensor:
        return Y.reshape(Y.shape[0], -1).T

    def _matmat(self, X: Tensor) -> Tensor:
        return self._from_mats(self.matmul_matrix(self._to_mats(X)))

    def _prepare(self, damping: float, damping_mode: str) -> None:
        if damping_mode == "heuristic":
            self.heuristic_inverses(damping)
        else:
            self.eig()

    def _solve(self, X: Tensor, damping: Damping, damping_mode: str) -> Tensor:
        damping = self._scalar_damping(damping, "the solve", _KRON_ALTERNATIVE)
        return self._from_mats(self.solve_matrix(self._to_mats(X), damping, damping_mode))

    def _is_singular(self) -> bool:
        sA, _, sB, _ = self.eig()
        tol = 1e-12
        return bool((sA <= tol * max(1.0, float(sA.max()))).any()
                    or (sB is not None and (sB <= tol * max(1.0, float(sB.max()))).any()))

    def _logdet(self, damping: Damping) -> Tensor:
        damping = self._scalar_damping(damping, "the log-determinant", _KRON_ALTERNATIVE)
        sA, _, sB, _ = self.eig()
        sB = sB if sB is not None else torch.ones(self.d_out, dtype=torch.float64, device=sA.device)
        vals = sB[:, None] * sA[None, :] + damping
        if (vals <= 0).any():
            raise SingularError(f"{self.name} + {damping}·I is singular; pass damping > 0")
        return vals.log().sum()

    @override
    def diagonal(self) -> Tensor:
        dB = self.B.diagonal() if self.B is not None else torch.ones(
            self.d_out, dtype=self.dtype, device=self.device)
        return torch.outer(dB, self.A.diagonal()).reshape(-1)

    @override
    def to_dense(self) -> Tensor:
        self._check_dense_memory()
        B = self.B if self.B is not None else torch.eye(self.d_out, dtype=self.dtype, device=self.device)
        return torch.kron(B, self.A)

    # ------------------------------------------------------------------ Laplace-side methods
    # Standard (exact) damping only. In the eigenbasis U_B ⊗ U_A the damped operator is diagonal
    # with eigenvalues s_B s_Aᵀ + λ (d_out × d_in); a column block X (P, k) of row-major vec_r(G_j)
    # is handled as G of shape (o, d, k) so that every product below is one GEMM.
    def _eigenbasis(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(U_A, U_B, s_B s_Aᵀ)`` in float64 (``U_B = I``, ``s_B = 1`` for an identity ``B``)."""
        sA, UA, sB, UB = self.eig()
        if sB is None or UB is None:  # both None exactly for B = I
            sB = torch.ones(self.d_out, dtype=torch.float64, device=sA.device)
            UB = torch.eye(self.d_out, dtype=torch.float64, device=sA.device)
        return UA, UB, sB[:, None] * sA[None, :]

    def _damped_eigenvalues(self, damping: Damping, what: str) -> Tensor:
        lam = self._eigenbasis()[2] + self._scalar_damping(damping, what, _KRON_ALTERNATIVE)
        if (lam <= 0).any():
            raise SingularError(f"{self.name} + {float(lam.min()):.3g}·I is singular; pass damping > 0")
        return lam

    def _to_eig(self, X: Tensor) -> Tensor:
        """``U_Bᵀ G_j U_A`` for every column ``j``: ``(P, k) -> (o, k, d)`` (float64)."""
        UA, UB, _ = self._eigenbasis()
        k = X.shape[1]
        Z = UB.T @ X.to(torch.float64).contiguous().reshape(self.d_out, self.d_in * k)
        Z = Z.reshape(self.d_out, self.d_in, k).transpose(1, 2).reshape(self.d_out * k, self.d_in)
        return (Z @ UA).reshape(self.d_out, k, self.d_in)

    def _from_eig(self, H: Tensor) -> Tensor:
        """``U_B H_j U_Aᵀ`` for ``H`` of shape ``(o, k, d)``: ``-> (P, k)`` (float64)."""
        UA, UB, _ = self._eigenbasis()
        k = H.shape[1]
        Y = (H.reshape(self.d_out * k, self.d_in) @ UA.T).reshape(self.d_out, k * self.d_in)
        Y = (UB @ Y).reshape(self.d_out, k, self.d_in)
        return Y.transpose(1, 2).reshape(self.shape[0], k)

    def _sample(self, k: int, damping: Damping, generator: torch.Generator | None) -> Tensor:
        """``U_B [Z ⊘ √(s_B s_Aᵀ + λ)] U_Aᵀ`` with ``Z`` standard normal."""
        lam = self._damped_eigenvalues(damping, "sampling")
        Z = torch.randn(self.d_out, k, self.d_in, dtype=torch.float64, device=lam.device,
                        generator=generator)
        return self._from_eig(Z * lam.rsqrt()[:, None, :]).to(self.dtype)

    def _inverse_diagonal(self, damping: Damping) -> Tensor:
        """``diag((B ⊗ A + λI)⁻¹) = vec_r((U_B ⊙ U_B) (1 ⊘ (s_B s_Aᵀ + λ)) (U_A ⊙ U_A)ᵀ)``."""
        lam = self._damped_eigenvalues(damping, "the inverse diagonal")
        UA, UB, _ = self._eigenbasis()
        return ((UB**2) @ (1.0 / lam) @ (UA**2).T).reshape(-1)

    def _inverse_quad_blocks(self, J, R: int, damping: Damping) -> Tensor:
        """``Jᵀ (B ⊗ A + δI)⁻¹ J`` blocks in the eigenbasis (scalar ``δ`` only).

        ``Σ_{ij} H_{m,ij} H_{m',ij} / λ_ij`` with ``H_m = U_Bᵀ G_m U_A``, ``λ_ij = s_B,i s_A,j + δ``.

        A layer factor (column ``G_m = Σ_t e_{mt} a_{nt}ᵀ``) is rotated, ``ã = a U_A``,
        ``ẽ = e U_B``, and :meth:`~curvkit.linalg.OuterProductFactor.weighted_block_grams64` with
        ``w = 1/λ`` gives the blocks without the ``P × M`` matrix (``T = 1``:
        ``Σ_i ẽ_{ri} ẽ_{r'i} W_{ni}``, ``W = (ã ⊙ ã)(1/λ)ᵀ``). Other factors: explicit float64
        columns in bounded chunks.
        """
        from curvkit.linalg.lowrank import chunked_group_grams
        from curvkit.linalg.outer import as_outer

        lam = self._damped_eigenvalues(damping, "the functional variance")
        UA, UB, _ = self._eigenbasis()
        layer = as_outer(J)
        if layer is not None and layer[0].R == R and (layer[0].d_out, layer[0].d_in) == lam.shape:
            f, scale = layer
            rot = f.rotated(UA, None if self.B is None else UB)
            return rot.weighted_block_grams64(1.0 / lam) * scale**2

        def whitened(X: Tensor) -> Tensor:  # (P, k) -> vec of U_Bᵀ G U_A ⊘ √λ per column
            H = self._to_eig(X) * lam.rsqrt()[:, None, :]  # (o, k, d)
            return H.transpose(0, 1).reshape(X.shape[1], -1).T

        return chunked_group_grams(J, R, whitened)

    def _eigenvalues(self) -> Tensor:
        return self._eigenbasis()[2].reshape(-1)

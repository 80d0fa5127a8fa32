"""Kronecker-factored operator ``B ⊗ A`` acting on row-major ``vec_r(V)``, ``V ∈ R^{d_out×d_in}``.

With row-major vectorisation ``(B ⊗ A) vec_r(V) = vec_r(B V A)`` for symmetric ``A``, ``B``
(math_spec §1). Two damped inverses (math_spec §5.3–5.4, paper eqs 3–4):

* ``"exact"`` (standard damping): ``(B ⊗ A + λI)⁻¹``, via eigendecompositions
  ``A = U_A diag(s_A) U_Aᵀ``, ``B = U_B diag(s_B) U_Bᵀ``::

      V ↦ U_B [ (U_Bᵀ V U_A) ⊘ (s_B s_Aᵀ + λ) ] U_Aᵀ

  (the public reference code transposes the B-side eigenbasis; this is the corrected formula).
* ``"heuristic"`` (factored Tikhonov): ``((B + λ_B I) ⊗ (A + λ_A I))⁻¹``::

      V ↦ (B + λ_B I)⁻¹ V (A + λ_A I)⁻¹,   λ_A = π√λ,  λ_B = √λ/π,
      π = sqrt( (tr A / d_in) / (tr B / d_out) )

  with the guard ``π = 1`` when ``π`` is not finite or not positive (e.g. a zero factor).

``B = None`` stands for the identity (FOOF: ``I ⊗ Â``, i.e. ``V ↦ V Â``). All factorisations are
done in float64 (eigh; Cholesky for the heuristic mode with an eigh fallback), also for float32
factors, so ill-conditioned factors do not crash.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvkit.linalg.operator import LinearOperator, SingularError


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


def _sym_eigh(S: Tensor) -> tuple[Tensor, Tensor]:
    S = S.to(torch.float64)
    s, U = torch.linalg.eigh(0.5 * (S + S.T))
    return s.clamp_min(0.0), U


def _damped_inverse(S: Tensor, damping: float) -> Tensor:
    """``(S + λI)⁻¹`` in float64 by Cholesky, falling back to eigh for ill-conditioned ``S``."""
    S64 = S.to(torch.float64)
    S64 = 0.5 * (S64 + S64.T) + damping * torch.eye(S.shape[0], dtype=torch.float64, device=S.device)
    L, info = torch.linalg.cholesky_ex(S64)
    if int(info) == 0:
        return torch.cholesky_inverse(L)
    s, U = torch.linalg.eigh(S64)
    if s.min() <= 0:
        raise SingularError(f"factor + {damping}·I is singular (min eigenvalue {s.min().item():.3g}); "
                            "pass a larger damping")
    return (U / s) @ U.T


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
            if F is not None and not torch.isfinite(F).all():
                raise FloatingPointError(f"{name or 'Kronecker'}: factor {nm} has non-finite entries")
        self.A, self.B = A, B
        self.d_in = A.shape[0]
        self.d_out = B.shape[0] if B is not None else int(d_out)
        super().__init__(self.d_out * self.d_in, A.dtype, A.device, name=name or "Kronecker")
        self._eig: tuple | None = None
        self._heur: dict[float, tuple[Tensor | None, Tensor]] = {}

    # ------------------------------------------------------------------ pieces
    def eig(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(s_A, U_A, s_B, U_B)`` in float64 (``None`` for an identity ``B``); cached."""
        if self._eig is None:
            sA, UA = _sym_eigh(self.A)
            sB, UB = _sym_eigh(self.B) if self.B is not None else (None, None)
            self._eig = (sA, UA, sB, UB)
        return self._eig

    def damping_split(self, damping: float) -> tuple[float, float]:
        """``(λ_A, λ_B)`` of the heuristic (π) damping."""
        return pi_damping(self.A, self.B, damping)

    def heuristic_inverses(self, damping: float) -> tuple[Tensor | None, Tensor]:
        """``((B + λ_B I)⁻¹, (A + λ_A I)⁻¹)`` in float64 (first is ``None``/scalar for ``B = I``)."""
        if damping not in self._heur:
            lam_a, lam_b = self.damping_split(damping)
            Ai = _damped_inverse(self.A, lam_a)
            Bi = _damped_inverse(self.B, lam_b) if self.B is not None else None
            if len(self._heur) > 4:
                self._heur.clear()
            self._heur[damping] = (Bi, Ai)
        return self._heur[damping]

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
        if UB is None:
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

    def _solve(self, X: Tensor, damping: float, damping_mode: str) -> Tensor:
        return self._from_mats(self.solve_matrix(self._to_mats(X), damping, damping_mode))

    def _is_singular(self) -> bool:
        sA, _, sB, _ = self.eig()
        tol = 1e-12
        return bool((sA <= tol * max(1.0, float(sA.max()))).any()
                    or (sB is not None and (sB <= tol * max(1.0, float(sB.max()))).any()))

    def _logdet(self, damping: float) -> Tensor:
        sA, _, sB, _ = self.eig()
        sB = sB if sB is not None else torch.ones(self.d_out, dtype=torch.float64, device=sA.device)
        vals = sB[:, None] * sA[None, :] + damping
        if (vals <= 0).any():
            raise SingularError(f"{self.name} + {damping}·I is singular; pass damping > 0")
        return vals.log().sum()

    def diagonal(self) -> Tensor:
        dB = self.B.diagonal() if self.B is not None else torch.ones(
            self.d_out, dtype=self.dtype, device=self.device)
        return torch.outer(dB, self.A.diagonal()).reshape(-1)

    def to_dense(self) -> Tensor:
        B = self.B if self.B is not None else torch.eye(self.d_out, dtype=self.dtype, device=self.device)
        return torch.kron(B, self.A)

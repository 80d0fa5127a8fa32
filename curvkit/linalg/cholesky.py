"""The one damped factorisation: ``S + D = L Lᵀ`` in float64, with a fallback when Cholesky fails.

Every solve of a small symmetric system in curvkit goes through :func:`damped_cholesky`
(Woodbury's ``M × M`` core, Kronecker factors, dense blocks, the optimizers' factor inverses):
``S`` is symmetrised, the damping ``D`` (a scalar ``λ`` or a diagonal ``(n,)`` tensor) is added,
and the result is factorised by Cholesky in float64. When Cholesky fails (``S + D`` numerically
indefinite, e.g. a rank-deficient factor with a tiny damping), one of two fallbacks is taken and a
``RuntimeWarning`` is emitted once per ``name``:

* ``fallback="eigh"``: ``S + D = Q diag(s) Qᵀ``; eigenvalues ``s ≤ n·ε·max|s|`` mean the matrix is
  singular and raise :class:`~curvkit.linalg.SingularError` (never a silently huge inverse);
* ``fallback="shift"``: Cholesky of ``S + D + τ I`` with the trace-scaled shift
  ``τ = 10^k · ε · tr(S + D)/n`` (``k = 0, 2, 4, …`` until it succeeds; the shift used is stored).

The returned :class:`SPDFactor` applies ``(S + D)⁻¹``, forms the inverse (``cholesky_inverse``),
the log-determinant, ``diag((S + D)⁻¹)``, a half-solve ``H`` with ``Hᵀ H = Xᵀ (S + D)⁻¹ X`` and a
square root ``R`` of the inverse (``R Rᵀ = (S + D)⁻¹``) for Gaussian sampling.

Batches of small ``C × C`` matrices (the functional covariances of the Laplace predictive) go
through :func:`batched_psd_sqrt` and :func:`batched_spd_solve`.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from curvkit.linalg.finite import all_finite
from curvkit.linalg.operator import SingularError

__all__ = ["SPDFactor", "batched_psd_sqrt", "batched_spd_solve", "damped_cholesky"]

_WARNED: set[str] = set()
FALLBACKS = ("eigh", "shift")


class SPDFactor:
    """A factorised symmetric positive definite ``S`` (``n × n``): Cholesky or eigendecomposition.

    Attributes:
        kind: ``"chol"`` (``S = L Lᵀ``) or ``"eigh"`` (``S = Q diag(s) Qᵀ``).
        L: the lower Cholesky factor (``kind == "chol"``).
        evals, evecs: ``s`` and ``Q`` (``kind == "eigh"``).
        shift: the trace-scaled shift ``τ`` added by ``fallback="shift"`` (0 otherwise).
        dtype: the dtype it was computed in (float64 unless asked otherwise).
    """

    def __init__(self, L: Tensor | None = None, evals: Tensor | None = None,
                 evecs: Tensor | None = None, shift: float = 0.0) -> None:
        self.L, self.evals, self.evecs, self.shift = L, evals, evecs, float(shift)
        self.kind = "chol" if L is not None else "eigh"
        ref = L if L is not None else evecs
        if ref is None or (L is None and evals is None):
            raise ValueError("SPDFactor needs L (Cholesky) or both evals and evecs (eigh)")
        self.n, self.dtype, self.device = ref.shape[0], ref.dtype, ref.device

    def _eig(self) -> tuple[Tensor, Tensor]:
        """``(s, Q)`` of an ``"eigh"`` factor."""
        if self.evals is None or self.evecs is None:
            raise RuntimeError("SPDFactor has no eigendecomposition (it is a Cholesky factor)")
        return self.evals, self.evecs

    def solve(self, B: Tensor) -> Tensor:
        """``S⁻¹ B`` for ``B`` of shape ``(n, k)`` (computed and returned in :attr:`dtype`)."""
        B = B.to(self.dtype)
        if self.L is not None:  # two triangular solves: cholesky_solve would copy L first
            Y = torch.linalg.solve_triangular(self.L, B, upper=False)
            return torch.linalg.solve_triangular(self.L.mT, Y, upper=True)
        evals, evecs = self._eig()
        return evecs @ ((evecs.T @ B) / evals[:, None])

    def inverse(self) -> Tensor:
        """``S⁻¹`` (``cholesky_inverse``, no solve against the identity)."""
        if self.L is not None:
            return torch.cholesky_inverse(self.L)
        evals, evecs = self._eig()
        return (evecs / evals) @ evecs.T

    def logdet(self) -> Tensor:
        """``log det S`` (scalar tensor)."""
        if self.L is not None:
            return 2.0 * self.L.diagonal().log().sum()
        return self._eig()[0].log().sum()

    def half_solve(self, X: Tensor) -> Tensor:
        """``H`` with ``Hᵀ H = Xᵀ S⁻¹ X``: ``L⁻¹ X`` (Cholesky) or ``s^{-1/2} ⊙ Qᵀ X`` (eigh)."""
        X = X.to(self.dtype)
        if self.L is not None:
            return torch.linalg.solve_triangular(self.L, X, upper=False)
        evals, evecs = self._eig()
        return (evecs.T @ X) * evals.rsqrt()[:, None]

    def inv_sqrt(self, Z: Tensor) -> Tensor:
        """``R Z`` with ``R Rᵀ = S⁻¹``: ``L⁻ᵀ Z`` or ``Q diag(s^{-1/2}) Z``.

        ``Z ∼ N(0, I)`` gives ``N(0, S⁻¹)``.
        """
        Z = Z.to(self.dtype)
        if self.L is not None:
            return torch.linalg.solve_triangular(self.L.T, Z, upper=True)
        evals, evecs = self._eig()
        return evecs @ (Z * evals.rsqrt()[:, None])

    def inverse_diagonal(self) -> Tensor:
        """``diag(S⁻¹)`` of shape ``(n,)``: column norms² of ``L⁻¹`` (or ``Σ_j Q_ij²/s_j``)."""
        if self.L is not None:
            eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
            return (torch.linalg.solve_triangular(self.L, eye, upper=False) ** 2).sum(0)
        evals, evecs = self._eig()
        return (evecs**2) @ (1.0 / evals)


def _warn_once(name: str, message: str) -> None:
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def damped_cholesky(S: Tensor, damping: float | Tensor = 0.0, *, name: str = "matrix",
                    fallback: str = "eigh", dtype: torch.dtype = torch.float64,
                    symmetrize: bool = True) -> SPDFactor:
    """Factorise ``S + D`` (symmetrised) by Cholesky, falling back as in the module doc.

    Args:
        S: ``(n, n)`` symmetric (PSD up to round-off) matrix, any float dtype.
        damping: ``λ ≥ 0`` (``D = λ I``) or a ``(n,)`` tensor (``D = diag(d)``).
        name: what ``S`` is, for error and warning messages (warnings are emitted once per name).
        fallback: ``"eigh"`` (eigendecomposition; singular raises) or ``"shift"`` (trace-scaled
            shift, retried).
        dtype: the factorisation dtype (float64 by default, also for float32 input).
        symmetrize: form ``(S + Sᵀ)/2`` first; pass ``False`` for a matrix that is symmetric by
            construction (saves one ``n × n`` pass; Cholesky reads the lower triangle only).

    Returns:
        The :class:`SPDFactor` of ``S + D``.

    Raises:
        ValueError: ``S`` is not square, has non-finite entries, or ``fallback`` is unknown.
        SingularError: ``fallback="eigh"`` and ``S + D`` is singular or indefinite.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {list(FALLBACKS)}, got {fallback!r}")
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(S.shape)}")
    n = S.shape[0]
    A = S.to(dtype)
    A = 0.5 * (A + A.T) if symmetrize else A.clone()
    desc = f"{name} + diag(damping)"
    if isinstance(damping, Tensor) and damping.dim() > 0:
        if damping.shape != (n,):
            raise ValueError(f"damping for {name} must be a scalar or shape ({n},), "
                             f"got {tuple(damping.shape)}")
        A.diagonal().add_(damping.to(device=A.device, dtype=dtype))
    else:
        desc = f"{name} + {float(damping)}·I"
        if float(damping) != 0.0:
            A.diagonal().add_(float(damping))
    if not all_finite(A):
        raise ValueError(f"{desc} has non-finite entries (NaN or Inf); check its inputs")
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return SPDFactor(L=L)
    if fallback == "shift":
        base = max(float(A.diagonal().sum()) / max(n, 1), torch.finfo(dtype).tiny)
        eps = torch.finfo(dtype).eps
        for k in range(0, 17, 2):
            tau = base * eps * 10.0**k
            A2 = A.clone()
            A2.diagonal().add_(tau)
            L, info = torch.linalg.cholesky_ex(A2)
            if int(info) == 0:
                _warn_once(name, f"{desc}: Cholesky failed; factorised with the trace-scaled shift "
                                 f"τ = {tau:.3g} added to the diagonal")
                return SPDFactor(L=L, shift=tau)
        raise SingularError(f"{desc} is not positive definite even with a shift of "
                            f"{tau:.3g}; pass a larger damping")
    evals, evecs = torch.linalg.eigh(A)
    tol = float(evals.abs().max()) * n * torch.finfo(dtype).eps
    smallest = float(evals.min())
    if not smallest > tol or not math.isfinite(smallest):
        raise SingularError(f"{desc} is singular (smallest eigenvalue {smallest:.3g}); "
                            "pass a larger damping")
    _warn_once(name, f"{desc}: Cholesky failed (ill-conditioned); using its eigendecomposition "
                     f"(smallest eigenvalue {smallest:.3g})")
    return SPDFactor(evals=evals, evecs=evecs)


def batched_psd_sqrt(S: Tensor) -> Tensor:
    """Symmetric square roots ``R = Q diag(√max(s, 0)) Qᵀ`` of a batch of PSD matrices.

    ``(S + Sᵀ)/2 = Q diag(s) Qᵀ`` per matrix; eigenvalues below 0 (round-off of a PSD matrix)
    are clamped to 0, so ``R R = S`` for PSD ``S`` and ``R z`` with ``z ∼ N(0, I)`` is
    ``N(0, S)``.

    Args:
        S: ``(B, n, n)`` symmetric positive semi-definite matrices, computed in their own dtype.

    Returns:
        ``(B, n, n)`` symmetric square roots, same dtype as ``S``.

    Raises:
        ValueError: ``S`` is not a batch of square matrices.
    """
    if S.dim() != 3 or S.shape[1] != S.shape[2]:
        raise ValueError(f"expected a batch of square matrices (B, n, n), got shape {tuple(S.shape)}")
    evals, evecs = torch.linalg.eigh(0.5 * (S + S.transpose(1, 2)))
    return (evecs * evals.clamp_min(0.0).sqrt()[:, None, :]) @ evecs.transpose(1, 2)


def batched_spd_solve(S: Tensor, B: Tensor, *, name: str = "matrix") -> tuple[Tensor, Tensor]:
    """``S⁻¹ B`` and ``log det S`` for a batch of SPD matrices, by batched Cholesky in float64.

    Args:
        S: ``(K, n, n)`` symmetric positive definite matrices (the lower triangle is read).
        B: ``(K, n, k)`` right-hand sides.
        name: what ``S`` is, for the error message.

    Returns:
        ``(X, logdet)``: ``X = S⁻¹ B`` of shape ``(K, n, k)`` and ``log det S`` of shape ``(K,)``,
        both float64.

    Raises:
        ValueError: the shapes do not match.
        SingularError: some ``S[i]`` is not positive definite (Cholesky fails).
    """
    if S.dim() != 3 or S.shape[1] != S.shape[2] or B.dim() != 3 or B.shape[:2] != S.shape[:2]:
        raise ValueError(f"{name}: expected S (K, n, n) and B (K, n, k), got {tuple(S.shape)} "
                         f"and {tuple(B.shape)}")
    L, info = torch.linalg.cholesky_ex(S.to(torch.float64))
    bad = (info != 0).nonzero().flatten()
    if bad.numel():
        raise SingularError(f"{name} {int(bad[0])} of the batch is not positive definite "
                            "(Cholesky failed); check its inputs")
    X = torch.cholesky_solve(B.to(torch.float64), L)
    return X, 2.0 * L.diagonal(dim1=1, dim2=2).log().sum(1)

"""(Preconditioned) conjugate gradients on products only, for ``(H̃ + D) v = b``."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from curvkit.linalg import SingularError

__all__ = ["conjugate_gradient"]


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    precond: Callable[[Tensor], Tensor] | None = None,
    tol: float = 1e-10,
    maxiter: int | None = None,
) -> tuple[Tensor, int, float]:
    """(Preconditioned) conjugate gradients for ``A x = b`` with ``A`` symmetric positive definite.

    Args:
        matvec: ``x ↦ A x`` on flat tensors.
        b: right-hand side ``(P,)``.
        precond: ``r ↦ M⁻¹ r`` for an SPD preconditioner ``M ≈ A`` (default: none).
        tol: stop when ``‖b − A x‖ ≤ tol · ‖b‖``.
        maxiter: iteration cap (default ``max(100, 2·P)``).

    Returns:
        ``(x, iterations, relative residual)``; warns if ``tol`` was not reached.

    Raises:
        SingularError: ``A`` is not positive definite along a search direction.
    """
    maxiter = max(100, 2 * b.numel()) if maxiter is None else int(maxiter)
    x = torch.zeros_like(b)
    bnorm = float(torch.linalg.vector_norm(b))
    if bnorm == 0.0:
        return x, 0, 0.0
    r = b.clone()
    z = precond(r) if precond is not None else r
    p = z.clone()
    rz = torch.dot(r, z)
    res = 1.0
    for k in range(1, maxiter + 1):
        Ap = matvec(p)
        pAp = torch.dot(p, Ap)
        if not pAp > 0:
            raise SingularError(
                f"conjugate gradients: the system matrix is not positive definite (pᵀAp = "
                f"{float(pAp):.3g} at iteration {k}); the Hessian is indefinite at this point -- "
                "increase damping or use method='dense'")
        alpha = rz / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        res = float(torch.linalg.vector_norm(r)) / bnorm
        if res <= tol:
            return x, k, res
        z = precond(r) if precond is not None else r
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    warnings.warn(f"conjugate gradients stopped after {maxiter} iterations at relative residual "
                  f"{res:.3g} > tol={tol:g}; increase maxiter or damping", RuntimeWarning,
                  stacklevel=2)
    return x, maxiter, res



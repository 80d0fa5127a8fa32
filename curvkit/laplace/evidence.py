"""The Laplace evidence as pure functions (MacKay 1992; Immer et al. 2021; Benzing 2022, App. G).

With ``Λ = Λ_p + n·F``, ``Λ_p = diag(δ)`` and ``n = num_data``::

    log p(D) ≈ (n/N_ℓ) Σ log p(y | x, θ_MAP)                   (batch log-likelihood scaled to n)
             + log N(θ_MAP; 0, Λ_p⁻¹)                           (−½θᵀΛ_pθ + ½ log det Λ_p − (P/2) log 2π)
             + (P/2) log 2π − ½ log det Λ                        (Gaussian integral)
           = (n/N_ℓ) Σ log p − ½ θᵀΛ_pθ + ½ log det Λ_p − ½ log det Λ

(the ``(P/2) log 2π`` terms cancel; the sum runs over the ``N_ℓ`` loss terms of the batch -- its
``N`` inputs, or the non-ignored positions of outputs ``(N, …, C)``, as the Fisher's mean -- and
``n`` counts loss terms too), as laplace-torch's ``log_marginal_likelihood`` with its summed
GGN over ``n`` points and ``temperature = 1``.

**Cost rule for new scalar priors.** ``log det(n F + δ I)`` at one new ``δ`` needs one Cholesky
factorisation of the ``M × M`` (or ``P × P``) core (``n³/3`` flops); every ``δ`` at once needs one
eigendecomposition (``eigvalsh``, measured at :data:`EIGH_OVER_CHOLESKY` times a Cholesky of the
same size on CPU). So: eigenvalues when they are cached or when more than
:data:`EIGH_OVER_CHOLESKY` values are asked for at once (prior optimisation, grids); otherwise one
Cholesky per value (:func:`use_eigenvalues`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from curvkit.laplace.prior import PriorPrecision

#: cost of ``eigvalsh`` over one Cholesky of the same matrix (CPU, float64, n = 2000–9000).
EIGH_OVER_CHOLESKY = 30


def use_eigenvalues(n_values: int, cached: bool) -> bool:
    """Whether ``n_values`` scalar-prior log-determinants should come from one eigendecomposition.

    Args:
        n_values: how many values are asked for at once.
        cached: whether the eigenvalues are already available.

    Returns:
        ``True`` for the eigenvalue route (module doc's cost rule).
    """
    return cached or n_values > EIGH_OVER_CHOLESKY


def laplace_evidence(log_likelihood: Tensor, prior: PriorPrecision, theta: Tensor,
                     logdet_posterior: Tensor) -> Tensor:
    """``(n/N_ℓ) Σ log p − ½ θᵀΛ_pθ + ½ log det Λ_p − ½ log det Λ`` (module doc).

    Args:
        log_likelihood: the scaled batch log-likelihood.
        prior: the prior precision ``Λ_p``.
        theta: ``θ_MAP`` (flat, ``params`` order).
        logdet_posterior: ``log det Λ``.

    Returns:
        The float64 scalar evidence.
    """
    return (log_likelihood - 0.5 * prior.scatter(theta) + 0.5 * prior.logdet()
            - 0.5 * logdet_posterior)


def maximize_evidence(logdet_fn: Callable[[Tensor], Tensor], log_likelihood: float, sq: Tensor,
                      sizes: Tensor, x0: np.ndarray, bounds: tuple[float, float],
                      max_iter: int) -> np.ndarray:
    """Maximise the evidence over ``t = log δ`` (one entry per group) by L-BFGS-B.

    The objective is ``log p − ½ Σ_g e^{t_g} ‖θ_g‖² + ½ Σ_g P_g t_g − ½ logdet_fn(t)`` with exact
    gradients (autograd); for a scalar the stationarity condition is MacKay's
    ``δ‖θ‖² = Σ_i λ_i/(δ + λ_i)``.

    Args:
        logdet_fn: ``t ↦ log det Λ(e^t)`` (differentiable).
        log_likelihood: the scaled batch log-likelihood.
        sq: ``‖θ_g‖²`` per group.
        sizes: ``P_g`` per group.
        x0: start (log scale).
        bounds: ``(low, high)`` on ``δ``.
        max_iter: iteration limit.

    Returns:
        The optimal ``log δ`` per group.
    """
    import scipy.optimize

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    scalar = len(x0) == 1

    def negative_evidence(x: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.tensor(x, dtype=torch.float64, device=sq.device, requires_grad=True)
        ld = logdet_fn(t[0]) if scalar else logdet_fn(t)
        ev = log_likelihood - 0.5 * (torch.exp(t) * sq).sum() + 0.5 * (sizes * t).sum() - 0.5 * ld
        (-ev).backward()
        if t.grad is None:  # ev always depends on t (the prior term)
            raise RuntimeError("the negative evidence has no gradient with respect to log δ")
        return float(-ev.detach()), t.grad.cpu().numpy().astype(np.float64)

    res = scipy.optimize.minimize(negative_evidence, np.clip(x0, lo, hi), jac=True,
                                  method="L-BFGS-B", bounds=[(lo, hi)] * len(x0),
                                  options={"maxiter": max_iter})
    if np.any(np.isclose(res.x, lo)) or np.any(np.isclose(res.x, hi)):
        warnings.warn(f"the optimal prior precision is at the bound of {bounds}; widen bounds=",
                      stacklevel=3)
    return res.x

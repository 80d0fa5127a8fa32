"""Predictive distributions from the functional mean and covariance (GLM) or sampled outputs (NN).

Notation: ``f(x; θ) ∈ R^C`` the model output, ``J(x) = ∂f(x; θ)/∂θ |_{θ_MAP} ∈ R^{C×P}``,
``Λ`` the posterior precision. These are functions of tensors only, never of the posterior:

* **GLM** (linearised network, Immer et al. 2021): ``f_lin(x; θ) = f(x; θ_MAP) + J(x)(θ − θ_MAP)``
  is Gaussian under the posterior, ``N(f(x; θ_MAP), Σ_f(x))`` with ``Σ_f(x) = J(x) Λ⁻¹ J(x)ᵀ``
  (``C × C``, from :meth:`curvkit.linalg.LinearOperator.inverse_quad_blocks`);
  :func:`glm_predictive` takes ``(f_mean (N, C), f_var (N, C, C))``.
* **NN**: outputs ``f(x; θ_s)`` at exact samples ``θ_s ∼ N(θ_MAP, Λ⁻¹)`` (Benzing 2022, App. C.1,
  eq 11); :func:`nn_predictive` takes them as ``(S, N, C)``.

Links (classification): ``"probit"`` is MacKay's approximation
``E[softmax(f)] ≈ softmax(f_MAP / √(1 + (π/8) diag Σ_f))`` (for ``"binary"`` the same with the
sigmoid); ``"mc"`` averages ``softmax(f_s)`` over ``f_s ∼ N(f_MAP, Σ_f)`` (GLM) or over weight
samples (NN). Regression returns the functional mean and covariance ``(N, C)``, ``(N, C, C)``;
the observation noise of curvkit's Gaussian likelihood has unit variance, so the predictive
covariance of ``y`` is ``Σ_f + I``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvkit.linalg import batched_psd_sqrt

PRED_TYPES = ("glm", "nn")
LINK_APPROX = ("probit", "mc")


def probit(f_mean: Tensor, f_var: Tensor, likelihood: str) -> Tensor:
    """MacKay's probit approximation of ``E[softmax(f)]`` (or ``E[σ(f)]`` for ``"binary"``).

    Args:
        f_mean: ``(N, C)``.
        f_var: ``(N, C, C)`` functional covariance (only its diagonal is used).
        likelihood: ``"binary"`` (elementwise sigmoid) or a softmax likelihood.

    Returns:
        ``(N, C)`` approximate predictive probabilities.
    """
    kappa = torch.rsqrt(1.0 + math.pi / 8.0 * f_var.diagonal(dim1=1, dim2=2).clamp_min(0.0))
    z = kappa * f_mean
    return torch.sigmoid(z) if likelihood == "binary" else torch.softmax(z, dim=1)


def link(f: Tensor, likelihood: str) -> Tensor:
    """``σ(f)`` (binary) or ``softmax(f)`` over the last dimension."""
    return torch.sigmoid(f) if likelihood == "binary" else torch.softmax(f, dim=-1)


def glm_predictive(f_mean: Tensor, f_var: Tensor, likelihood: str, link_approx: str = "probit",
                   n_samples: int = 100, generator: torch.Generator | None = None):
    """Linearised predictive from ``N(f_mean, f_var)`` (module doc).

    Args:
        f_mean: ``(N, C)`` outputs at ``θ_MAP``.
        f_var: ``(N, C, C)`` functional covariances ``J Λ⁻¹ Jᵀ``.
        likelihood: ``"classification"``, ``"binary"`` or ``"regression"``.
        link_approx: ``"probit"`` or ``"mc"``.
        n_samples: Monte Carlo samples for ``"mc"``.
        generator: randomness for ``"mc"``.

    Returns:
        Probabilities ``(N, C)``, or ``(f_mean, f_var)`` for regression; for ``f_mean`` of shape
        ``(N, …, C)`` and ``f_var`` ``(N, …, C, C)`` (per-position outputs) the same per position.
    """
    if f_mean.dim() > 2:  # positions are rows
        C = f_mean.shape[-1]
        res = glm_predictive(f_mean.reshape(-1, C), f_var.reshape(-1, C, C), likelihood,
                             link_approx, n_samples, generator)
        if isinstance(res, tuple):
            return res[0].reshape(f_mean.shape), res[1].reshape(f_var.shape)
        return res.reshape(f_mean.shape)
    if likelihood == "regression":
        return f_mean, f_var
    if link_approx == "probit":
        return probit(f_mean, f_var, likelihood)
    root = batched_psd_sqrt(f_var.to(torch.float64))
    N, C = f_mean.shape
    acc = torch.zeros(N, C, dtype=torch.float64, device=f_mean.device)
    step = max(1, 2**24 // max(1, N * C))
    for j in range(0, n_samples, step):
        k = min(step, n_samples - j)
        eps = torch.randn(k, N, C, 1, dtype=torch.float64, device=f_mean.device, generator=generator)
        f = f_mean.to(torch.float64)[None] + (root[None] @ eps)[..., 0]
        acc += link(f, likelihood).sum(0)
    return (acc / n_samples).to(f_mean.dtype)


def nn_predictive(f_samples: Tensor, likelihood: str):
    """Sampled-network predictive from outputs ``f(x; θ_s)`` of shape ``(S, N, C)`` or ``(S, N, …, C)``.

    Args:
        f_samples: outputs at the posterior samples.
        likelihood: ``"classification"``, ``"binary"`` or ``"regression"``.

    Returns:
        The mean of ``link(f_s)`` ``(N, …, C)``, or ``(mean, covariance)`` of ``f_s`` for
        regression (per position for ``(N, …, C)``).
    """
    if likelihood == "regression":
        mean = f_samples.mean(0)
        d = f_samples - mean
        return mean, torch.einsum("s...c,s...d->...cd", d, d) / max(1, f_samples.shape[0] - 1)
    return link(f_samples, likelihood).mean(0)

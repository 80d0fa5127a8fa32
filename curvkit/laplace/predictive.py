"""Predictive distributions of a Laplace posterior: linearised (GLM) and sampled network (NN).

Notation: ``f(x; θ) ∈ R^C`` the model output, ``J(x) = ∂f(x; θ)/∂θ |_{θ_MAP} ∈ R^{C×P}``,
``Λ`` the posterior precision.

* **GLM** (linearised network, Immer et al. 2021): ``f_lin(x; θ) = f(x; θ_MAP) + J(x)(θ − θ_MAP)``
  is Gaussian under the posterior, ``N(f(x; θ_MAP), Σ_f(x))`` with the functional covariance
  ``Σ_f(x) = J(x) Λ⁻¹ J(x)ᵀ`` (``C × C``). It is computed without sampling: for the full
  structure by ``cᵀΛ⁻¹c = cᵀΛ_p⁻¹c − qᵀU_M⁻¹q`` from Gram matrices of the test Jacobian columns
  (:meth:`~curvkit.linalg.perturb.DiagonalPlusLowRank.inverse_quad_blocks`), for the other
  structures from explicit test Jacobian columns and the block solves.
  The test Jacobian columns ``J(x_n)ᵀ 1_c`` are back-propagated like Fisher columns (one forward,
  ``C`` unit seeds), so for dense layers they are never materialised.
* **NN**: ``θ_s ∼ N(θ_MAP, Λ⁻¹)`` (exact samples), outputs ``f(x; θ_s)``.

Links (classification): ``"probit"`` is MacKay's approximation
``E[softmax(f)] ≈ softmax(f_MAP / √(1 + (π/8) diag Σ_f))`` (for ``"binary"`` the same with the
sigmoid); ``"mc"`` averages ``softmax(f_s)`` over ``f_s ∼ N(f_MAP, Σ_f)`` (GLM) or over weight
samples (NN). Regression returns the functional mean and covariance ``(N, C)``, ``(N, C, C)``;
the observation noise of curvkit's Gaussian likelihood has unit variance, so the predictive
covariance of ``y`` is ``Σ_f + I``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import functional_call

from curvkit.capture import LayerAdapter, as_logits
from curvkit.capture.batch import capture_columns
from curvkit.linalg import OuterProductFactor

if TYPE_CHECKING:  # pragma: no cover
    from curvkit.laplace.posterior import LaplacePosterior

PRED_TYPES = ("glm", "nn")
LINK_APPROX = ("probit", "mc")


def output_jacobian_factors(model: torch.nn.Module, x, layers: list[LayerAdapter], output_fn=None
                            ) -> tuple[Tensor, list[OuterProductFactor]]:
    """Per-layer factors whose column ``m = n·C + c`` is ``∂f_c(x_n)/∂W̃_l`` (layer layout).

    One forward pass and ``C`` backward passes with the unit seeds ``1_c`` (no scaling).

    Returns:
        ``(outputs (N, C) detached, [OuterProductFactor per layer])``.
    """
    def unit_seeds(out: Tensor) -> Tensor:
        if out.dim() != 2:
            raise ValueError(f"the model output must be a 2-D tensor (N, C), got {tuple(out.shape)}")
        N, C = out.shape
        return torch.eye(C, dtype=out.dtype, device=out.device).expand(N, C, C)

    out, a, e, _ = capture_columns(model, x, layers, unit_seeds, output_fn=output_fn)
    return out, [layer.factor(ai, ei) for layer, ai, ei in zip(layers, a, e)]


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


def _link(f: Tensor, likelihood: str) -> Tensor:
    return torch.sigmoid(f) if likelihood == "binary" else torch.softmax(f, dim=-1)


def _sqrt_psd(S: Tensor) -> Tensor:
    """Symmetric square roots of ``(N, C, C)`` PSD matrices (eigenvalues clamped at 0)."""
    evals, evecs = torch.linalg.eigh(0.5 * (S + S.transpose(1, 2)))
    return (evecs * evals.clamp_min(0.0).sqrt()[:, None, :]) @ evecs.transpose(1, 2)


def glm_predictive(post: LaplacePosterior, x: Tensor, link_approx: str, n_samples: int,
                   generator: torch.Generator | None):
    """Linearised predictive (see module doc)."""
    f_mean, f_var = post._functional(x)
    if post.likelihood == "regression":
        return f_mean, f_var
    if link_approx == "probit":
        return probit(f_mean, f_var, post.likelihood)
    root = _sqrt_psd(f_var.to(torch.float64))
    N, C = f_mean.shape
    acc = torch.zeros(N, C, dtype=torch.float64, device=f_mean.device)
    step = max(1, 2**24 // max(1, N * C))
    for j in range(0, n_samples, step):
        k = min(step, n_samples - j)
        eps = torch.randn(k, N, C, 1, dtype=torch.float64, device=f_mean.device, generator=generator)
        f = f_mean.to(torch.float64)[None] + (root[None] @ eps)[..., 0]
        acc += _link(f, post.likelihood).sum(0)
    return (acc / n_samples).to(f_mean.dtype)


def nn_predictive(post: LaplacePosterior, x: Tensor, n_samples: int,
                  generator: torch.Generator | None):
    """Sampled-network predictive: average of ``link(f(x; θ_s))`` over exact posterior samples."""
    names = post.param_names
    step = max(1, 2**27 // max(1, 8 * post.num_params))
    outs = []
    with torch.no_grad():
        for j in range(0, n_samples, step):
            thetas = post.sample(min(step, n_samples - j), generator)
            for th in thetas:
                params = {nm: t.view_as(p) for nm, t, p in
                          zip(names, th.split(post.numels), post.params)}
                if isinstance(x, Mapping):
                    out = functional_call(post.model, params, (), dict(x))
                else:
                    out = functional_call(post.model, params, tuple(x) if isinstance(
                        x, (tuple, list)) else (x,))
                outs.append(as_logits(out, post.output_fn))
    f = torch.stack(outs)  # (S, N, C)
    if post.likelihood == "regression":
        mean = f.mean(0)
        d = f - mean
        return mean, torch.einsum("snc,snd->ncd", d, d) / max(1, n_samples - 1)
    return _link(f, post.likelihood).mean(0)

"""Choosing the prior precision: evidence maximisation and validation grid search (App. G).

Functions of a :class:`~curvkit.laplace.LaplacePosterior`; the evidence itself is in
:mod:`curvkit.laplace.evidence`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from curvkit.curvature.data import is_single_batch, iter_batches
from curvkit.curvature.jacobian import log_likelihood_terms, num_loss_terms
from curvkit.laplace.evidence import maximize_evidence
from curvkit.linalg import batched_spd_solve


def marglik(post, per_layer: bool, bounds: tuple[float, float], max_iter: int):
    """Maximise the Laplace evidence over one ``δ`` or one ``δ_l`` per layer; set and return it.

    ``per_layer=False`` evaluates every ``δ`` from one eigendecomposition
    (:meth:`~curvkit.linalg.LinearOperator.eigenvalues`); ``per_layer=True`` uses
    :meth:`~curvkit.linalg.LinearOperator.logdet_function` over the layers (for ``"full"`` one
    Cholesky of the ``M × M`` core per evaluation). A layer's weight and bias share ``δ_l``.

    Args:
        post: the posterior.
        per_layer: scalar or per-layer.
        bounds: ``(low, high)`` on each ``δ``.
        max_iter: iteration limit.

    Returns:
        The new prior precision (float, or a list with one value per parameter tensor).

    Raises:
        ValueError: bad bounds.
    """
    lo, hi = float(bounds[0]), float(bounds[1])
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds!r}")
    fn = post.precision.logdet_function(post.layer_sizes if per_layer else None)
    sq = torch.stack([(v**2).sum() for v in post._layer_values(post._theta_layer)])
    sizes = torch.tensor(post.layer_sizes, dtype=torch.float64, device=sq.device)
    if not per_layer:
        sq, sizes = sq.sum().reshape(1), sizes.sum().reshape(1)
    layer_d = post._layer_values(post._to_layer(post.prior.diag))
    t0 = torch.stack([d.log().mean() for d in layer_d])
    x0 = t0.cpu().numpy() if per_layer else np.array([float(t0.mean())])
    x = maximize_evidence(fn, float(post.log_likelihood()), sq, sizes, x0, (lo, hi), max_iter)
    deltas = np.exp(x)
    value: float | list[float]
    if per_layer:
        owner = {}
        for li, layer in enumerate(post.layers):
            owner[id(layer.module.weight)] = li
            if layer.module.bias is not None:
                owner[id(layer.module.bias)] = li
        value = [float(deltas[owner[id(p)]]) for p in post.params]
    else:
        value = float(deltas[0])
    post.prior_precision = value
    return value


def gridsearch(post, per_layer: bool, x: Tensor | None, y: Tensor | None,
               grid: Sequence[float] | None, link_approx: str) -> float:
    """Scalar δ minimising the validation NLL of the GLM predictive over ``grid``; sets it.

    Classification/binary: ``−mean log p(y|x)`` of the predictive probabilities; regression: the
    Gaussian NLL with variance ``Σ_f + I``. Each grid value costs one factorisation of ``Λ``.

    Args:
        post: the posterior.
        per_layer: must be ``False``.
        x: held-out inputs, or an iterable of held-out batches.
        y: held-out targets (with a single batch ``x``).
        grid: candidates (default ``10^{-2}, 10^{-1.5}, …, 10^{4}``).
        link_approx: the GLM link.

    Returns:
        The best value.

    Raises:
        ValueError: ``per_layer``, missing held-out data or a bad grid.
    """
    if per_layer:
        raise ValueError("method='gridsearch' tunes a scalar prior precision; use "
                         "method='marglik' for per_layer=True")
    if x is None or is_single_batch(x) and (y is None or not isinstance(x, Tensor)
                               or not isinstance(y, Tensor) or x.shape[0] == 0
                               or y.shape[0] != x.shape[0]):
        raise ValueError("method='gridsearch' needs held-out data: val_inputs and val_targets "
                         "with the same (non-zero) number of rows, or val_inputs an iterable "
                         "of (x, y) batches")
    values = [float(v) for v in (grid if grid is not None else np.logspace(-2, 4, 13))]
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ValueError(f"grid must hold finite positive values, got {grid!r}")
    best, best_nll = values[0], math.inf
    for v in values:
        post.prior_precision = v
        nll = predictive_nll(post, x, y, link_approx)
        if nll < best_nll:
            best, best_nll = v, nll
    post.prior_precision = best
    return best

def predictive_nll(post, x, y, link_approx: str) -> float:
    """Mean NLL of the GLM predictive per loss term on ``(x, y)`` (or batches of them).

    Loss terms as the Fisher's: inputs, or the non-ignored positions of outputs ``(N, …, C)``.
    """
    total, count = 0.0, 0
    for b in iter_batches(x, y, post.label_key, False):
        if b.targets is None:
            raise ValueError("method='gridsearch' needs the labels of the held-out batches")
        s, n = batch_nll(post, b.inputs, b.targets, link_approx)
        total, count = total + s, count + n
    if count == 0:
        raise ValueError(f"every held-out target equals ignore_index={post.ignore_index}")
    return total / count


def batch_nll(post, x, y: Tensor, link_approx: str) -> tuple[float, int]:
    """``(summed NLL of the GLM predictive, number of loss terms)`` on one batch."""
    if post.likelihood == "regression":
        mean, cov = post.predictive(x, "glm")
        C = mean.shape[-1]
        mean, cov = mean.reshape(-1, C), cov.reshape(-1, C, C)  # one row per loss term
        S = cov.to(torch.float64) + torch.eye(C, dtype=torch.float64, device=cov.device)
        d = (y.reshape(-1, C).to(torch.float64) - mean.to(torch.float64))[:, :, None]
        Sinv_d, logdet = batched_spd_solve(S, d, name="predictive covariance Σ_f + I")
        quad = (d.transpose(1, 2) @ Sinv_d)[:, 0, 0]
        return float(0.5 * (quad + logdet + C * math.log(2 * math.pi)).sum()), int(mean.shape[0])
    p = post.predictive(x, "glm", link_approx, generator=torch.Generator(device=y.device).manual_seed(0))
    p = p.to(torch.float64).clamp(1e-12, 1 - 1e-12)
    if post.likelihood == "classification":  # log-probabilities as logits: log_softmax keeps them
        logp = p.log()
    else:  # Bernoulli probabilities -> logits
        logp = torch.logit(p)
    terms = log_likelihood_terms(logp, y, post.likelihood, post.ignore_index)
    return float(-terms.sum()), num_loss_terms(logp, y, post.likelihood, post.ignore_index)

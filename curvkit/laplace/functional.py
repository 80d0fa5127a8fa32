"""GLM functional moments ``(f(x; θ_MAP), J(x) Λ⁻¹ J(x)ᵀ)`` of test inputs, chunked over inputs.

``J(x) = ∂f(x; θ)/∂θ`` is never formed as a ``P``-sized matrix where the structure allows it: the
test inputs' layer inputs ``a`` and output-Jacobian errors ``e`` (``C`` unit seeds per input,
:func:`curvkit.curvature.jacobian.output_jacobian_factors`) give per-layer factors, and
``Λ.inverse_quad_blocks`` forms the ``C × C`` blocks from them (Woodbury: cross-Grams with the fit
columns; Kronecker: the rotated factors in the eigenbasis; diagonal: a weighted Gram). The test
inputs are processed in chunks sized by :func:`functional_bytes_per_input` so that the memory
stays bounded (``CHUNK_BYTES`` per chunk) for every structure and any number of inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.curvature.jacobian import batch_size, output_jacobian_factors, slice_inputs
from curvkit.linalg import LinearOperator, StackedFactor
from curvkit.linalg.lowrank import CHUNK_BYTES
from curvkit.linalg.outer import as_outer


def functional_bytes_per_input(probe: list, C: int, rank: int | None, per_parameter: bool) -> int:
    """Bytes per test input of :func:`functional_moments`, from one input's Jacobian factors.

    Per layer: a layer factor whose block is formed from its inputs and errors (Kronecker and
    diagonal blocks always; Woodbury blocks for ``T = 1`` without a per-parameter damping, through
    cross-Grams) keeps ``a``, ``e`` and their float64 and rotated copies
    (``3·8·(T·d_in + C·T·d_out)``); any other layer materialises its ``C`` explicit float64
    Jacobian columns (``2·8·C·P_l``). A low-rank (Woodbury) core adds its ``M × C`` cross-Grams
    (``3·8·M·C``). The operators chunk their own working memory within ``CHUNK_BYTES``.

    Args:
        probe: the per-layer factors of one test input.
        C: outputs per input.
        rank: ``M`` of a Woodbury core, or ``None`` (Kronecker, diagonal).
        per_parameter: whether the damping is a non-constant ``(P,)`` tensor.

    Returns:
        The estimate in bytes.
    """
    total = 3 * 8 * C * (rank or 0)
    for f in probe:
        layer = as_outer(f)
        if layer is not None and (rank is None or (layer[0].T == 1 and not per_parameter)):
            g = layer[0]
            total += 3 * 8 * (g.T * g.d_in + g.R * g.T * g.d_out)
        else:
            total += 2 * 8 * C * f.size
    return total


def functional_moments(model: torch.nn.Module, x, layers: list, precision: LinearOperator,
                       damping, rank: int | None = None, output_fn=None) -> tuple[Tensor, Tensor]:
    """``(f(x; θ_MAP) (N, …, C), J Λ⁻¹ Jᵀ (N, …, C, C) float64)`` with ``Λ = precision + D``.

    For outputs ``(N, …, C)`` every position gets its own ``C × C`` covariance (``T·C`` output
    Jacobian columns per input, :func:`~curvkit.curvature.jacobian.output_jacobian_factors`).

    Args:
        model: the network at ``θ_MAP``.
        x: the test inputs (tensor, tuple or dict batch).
        layers: the curvature's layers (layer space of ``precision``).
        precision: the layer-space operator (e.g. ``n·F``).
        damping: ``D``: a float or a layer-space ``(P,)`` tensor.
        rank: ``M`` of a Woodbury core (memory estimate), ``None`` otherwise.
        output_fn: maps the model output to the logits.

    Returns:
        The functional mean and covariances.
    """
    n_x = batch_size(x)
    _, probe = output_jacobian_factors(model, slice_inputs(x, 0, 1), layers, output_fn)
    R = probe[0].rank  # Jacobian columns per input: C, or T·C per position
    per_parameter = isinstance(damping, Tensor) and not bool((damping == damping[0]).all())
    per_input = functional_bytes_per_input(probe, R, rank, per_parameter)
    step = max(1, min(n_x, CHUNK_BYTES // max(1, per_input)))
    means, covs = [], []
    for i in range(0, n_x, step):
        out, Jt = output_jacobian_factors(model, slice_inputs(x, i, i + step), layers, output_fn)
        C = out.shape[-1]
        means.append(out)
        cov = precision.inverse_quad_blocks(StackedFactor(Jt), C, damping)
        covs.append(cov.reshape(*out.shape, C))
    return torch.cat(means), torch.cat(covs)

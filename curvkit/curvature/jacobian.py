"""Output-Jacobian factors of test inputs (for GLM functional variances) and target helpers.

Applications reach the capture through this module: :func:`output_jacobian_factors` runs one
forward and ``C`` backward seeds (``T·C`` for outputs ``(N, T, C)``: one per position and class)
and returns the per-layer factors whose column ``m = n·C + c`` is ``∂f_c(x_n)/∂W̃_l`` (layer
layout, no scaling), so ``J(x) Σ J(x)ᵀ`` is formed from Grams. The likelihood helpers
(:func:`check_targets`, :func:`log_likelihood_terms`, :func:`num_loss_terms`) follow the target
convention of :mod:`curvkit.capture.targets` (class dim last, ``ignore_index``, one loss term per
position).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.capture import (
    LABEL_KEY,
    LayerAdapter,
    as_logits,
    batch_size,
    forward,
    slice_inputs,
)
from curvkit.capture.batch import capture_columns
from curvkit.capture.targets import (
    MAX_EXACT_SEEDS,
    check_targets,
    log_likelihood_terms,
    num_loss_terms,
    per_position_seeds,
)
from curvkit.linalg import LowRankFactor

__all__ = ["output_jacobian_factors", "check_targets", "log_likelihood_terms", "num_loss_terms",
           "LABEL_KEY", "as_logits", "batch_size", "forward", "slice_inputs"]


def output_jacobian_factors(model: torch.nn.Module, x, layers: list[LayerAdapter], output_fn=None
                            ) -> tuple[Tensor, list[LowRankFactor]]:
    """Per-layer factors whose column ``m = n·R + r`` is ``∂f_r(x_n)/∂W̃_l`` (layer layout).

    For outputs ``(N, C)`` ``R = C``; for ``(N, …, C)`` ``R = T·C`` with ``T`` the number of
    positions, column ``r = t·C + c`` the derivative of class ``c`` at position ``t`` (row-major).

    Args:
        model: the network.
        x: the test inputs (tensor, tuple or dict).
        layers: the curvature's layers.
        output_fn: maps the model output to the logits (default: it or ``.logits``).

    Returns:
        ``(outputs (N, …, C) detached, [the layer rule's factor per layer])``.

    Raises:
        ValueError: the model output is not at least 2-D, or ``T·C`` exceeds
            :data:`~curvkit.capture.targets.MAX_EXACT_SEEDS` backward passes.
    """
    def unit_seeds(out: Tensor) -> Tensor:
        if out.dim() < 2:
            raise ValueError(f"the model output must be (N, C) or (N, ..., C), got "
                             f"{tuple(out.shape)}")
        C = out.shape[-1]
        R = out[0].numel()  # T·C
        if R > MAX_EXACT_SEEDS:
            raise ValueError(
                f"the output Jacobian of outputs of shape {tuple(out.shape)} needs {R} backward "
                f"passes per input (positions × classes); use pred_type='nn' (sampled weights) "
                "for the predictive of such outputs")
        eye = torch.eye(C, dtype=out.dtype, device=out.device).expand(*out.shape, C)
        return eye if out.dim() == 2 else per_position_seeds(eye)

    out, a, e, _ = capture_columns(model, x, layers, unit_seeds, output_fn=output_fn)
    return out, [layer.factor(ai, ei) for layer, ai, ei in zip(layers, a, e)]

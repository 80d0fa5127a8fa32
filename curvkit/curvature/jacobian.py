"""Output-Jacobian factors of test inputs (for GLM functional variances) and target checks.

Applications reach the capture through this module: :func:`output_jacobian_factors` runs one
forward and ``C`` backward seeds and returns the per-layer factors whose column ``m = n·C + c`` is
``∂f_c(x_n)/∂W̃_l`` (layer layout, no scaling), so ``J(x) Σ J(x)ᵀ`` is formed from Grams.
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
from curvkit.capture.targets import check_targets
from curvkit.linalg import LowRankFactor

__all__ = ["output_jacobian_factors", "check_targets", "LABEL_KEY", "as_logits", "batch_size",
           "forward", "slice_inputs"]


def output_jacobian_factors(model: torch.nn.Module, x, layers: list[LayerAdapter], output_fn=None
                            ) -> tuple[Tensor, list[LowRankFactor]]:
    """Per-layer factors whose column ``m = n·C + c`` is ``∂f_c(x_n)/∂W̃_l`` (layer layout).

    Args:
        model: the network.
        x: the test inputs (tensor, tuple or dict).
        layers: the curvature's layers.
        output_fn: maps the model output to the logits (default: it or ``.logits``).

    Returns:
        ``(outputs (N, C) detached, [the layer rule's factor per layer])``.

    Raises:
        ValueError: the model output is not a 2-D tensor.
    """
    def unit_seeds(out: Tensor) -> Tensor:
        if out.dim() != 2:
            raise ValueError(f"the model output must be a 2-D tensor (N, C), got {tuple(out.shape)}")
        N, C = out.shape
        return torch.eye(C, dtype=out.dtype, device=out.device).expand(N, C, C)

    out, a, e, _ = capture_columns(model, x, layers, unit_seeds, output_fn=output_fn)
    return out, [layer.factor(ai, ei) for layer, ai, ei in zip(layers, a, e)]

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
    layer_errors,
    record,
    slice_inputs,
)
from curvkit.capture.targets import check_targets
from curvkit.linalg import OuterProductFactor

__all__ = ["output_jacobian_factors", "check_targets", "LABEL_KEY", "as_logits", "batch_size",
           "forward", "slice_inputs"]


def output_jacobian_factors(model: torch.nn.Module, x, layers: list[LayerAdapter], output_fn=None
                            ) -> tuple[Tensor, list[OuterProductFactor]]:
    """Per-layer factors whose column ``m = n·C + c`` is ``∂f_c(x_n)/∂W̃_l`` (layer layout).

    Args:
        model: the network; x: the test inputs (tensor, tuple or dict); layers: the curvature's
            layers; output_fn: maps the model output to the logits (default: it or ``.logits``).

    Returns:
        ``(outputs (N, C) detached, [OuterProductFactor per layer])``.

    Raises:
        ValueError: the model output is not a 2-D tensor.
    """
    with torch.enable_grad(), record(layers, keep_outputs=True) as rec:
        out = forward(model, x, output_fn)
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise ValueError(f"the model output must be a 2-D tensor (N, C), got "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        rec.check_complete(layers)
        N, C = out.shape
        seeds = torch.eye(C, dtype=out.dtype, device=out.device).expand(N, C, C)
        errors = layer_errors(out, rec, layers, seeds)
    return out.detach(), [OuterProductFactor(a, e) for a, e in zip(rec.inputs, errors)]

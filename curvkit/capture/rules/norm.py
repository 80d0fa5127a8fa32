"""Rules for the affine parameters of normalisation layers, in explicit (per-sample) form.

A norm layer computes ``s_t = γ ⊙ x̂_t + β`` at each location ``t`` from the normalised input
``x̂_t``. With ``e_{mt} = ∂⟨seed_m, f⟩/∂s_t`` its per-column gradients are::

    ∂/∂γ = Σ_t e_{mt} ⊙ x̂_{nt}        ∂/∂β = Σ_t e_{mt}

(``d`` numbers each, no Kronecker form is needed and none is cheaper). The rule records ``x̂``
(recomputed from the layer input exactly as the module normalises it) and ``e``, and returns the
gradients as explicit columns (``a = 1``; see :class:`~curvkit.capture.rules.base.ExplicitAdapter`).

* ``BatchNorm1d/2d/3d`` in eval mode with running statistics: ``x̂ = (x − μ_run)/√(σ²_run + ε)``
  per channel (locations: every position of every channel map). In train mode (or without
  running statistics) the normalisation couples the inputs of a batch, so per-sample gradients do
  not exist: refused, call ``model.eval()``.
* ``LayerNorm`` (over ``normalized_shape``), ``RMSNorm`` (``x̂ = x/√(mean x² + ε)``, no ``β``),
  ``GroupNorm`` (per sample and group; ``γ``, ``β`` per channel).
"""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from curvkit.capture.rules.base import ExplicitAdapter, UnsupportedLayerError


class NormAdapter(ExplicitAdapter):
    """Affine parameters of a normalisation layer (module docstring)."""

    family: ClassVar[str] = "norm"

    def normalised(self, x: Tensor) -> Tensor:
        """``x̂`` with the affine dimension last: ``(N, T, d)``."""
        raise NotImplementedError

    @override
    def inputs(self, x: Tensor, module: nn.Module | None = None,
               batch_size: int | None = None) -> Tensor:
        return self.normalised(x.detach())

    @override
    def per_sample(self, a: Tensor, e: Tensor) -> Tensor:
        N = a.shape[0]
        M, T, d = e.shape
        e4 = e.reshape(N, M // N, T, d)
        parts = []
        if self.weight:
            parts.append(torch.einsum("nrtd,ntd->nrd", e4, a).reshape(M, d))
        if self.bias:
            parts.append(e.sum(1))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


class ChannelNormAdapter(NormAdapter):
    """Norm layers with the affine dimension 1 (BatchNorm, GroupNorm): channel moved last."""

    @override
    def errors(self, grad_out: Tensor, batch_size: int | None = None) -> Tensor:
        return _channel_last(grad_out, self.module)


def _channel_last(x: Tensor, m: nn.Module) -> Tensor:
    if isinstance(m, nn.BatchNorm1d) and x.dim() == 1 or isinstance(m, nn.GroupNorm) and x.dim() == 1:
        x = x.unsqueeze(0)
    N, C = x.shape[:2]
    return x.reshape(N, C, -1).transpose(1, 2)


class BatchNormAdapter(ChannelNormAdapter):
    """``BatchNorm1d/2d/3d`` in eval mode: ``x̂ = (x − μ_run)/√(σ²_run + ε)`` per channel."""

    def check(self) -> None:
        """Refuse train mode and missing running statistics (per-sample gradients do not exist).

        Raises:
            UnsupportedLayerError: the layer normalises with batch statistics.
        """
        m = cast("nn.modules.batchnorm._BatchNorm", self.module)
        if m.training or m.running_mean is None:
            raise UnsupportedLayerError(
                f"Layer {self.describe()} normalises with batch statistics (train mode or "
                "track_running_stats=False), which couples the inputs of a batch: per-sample "
                "gradients do not exist. Call model.eval() (running statistics), or freeze its "
                "parameters (requires_grad_(False))."
            )

    @override
    def normalised(self, x: Tensor) -> Tensor:
        self.check()
        m = cast("nn.modules.batchnorm._BatchNorm", self.module)
        xh = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
        return _channel_last(xh, m)


class GroupNormAdapter(ChannelNormAdapter):
    """``GroupNorm``: normalised per sample and group; ``γ``, ``β`` per channel."""

    @override
    def normalised(self, x: Tensor) -> Tensor:
        m = cast("nn.GroupNorm", self.module)
        return _channel_last(F.group_norm(x, m.num_groups, None, None, m.eps), m)


class LayerNormAdapter(NormAdapter):
    """``LayerNorm`` over ``normalized_shape``."""

    def _lead(self, x: Tensor) -> Tensor:
        shape = cast("nn.LayerNorm", self.module).normalized_shape
        d = math.prod(shape)
        k = len(shape)
        lead = x.shape[0] if x.dim() > k else 1
        return x.reshape(lead, -1, d)

    @override
    def normalised(self, x: Tensor) -> Tensor:
        m = cast("nn.LayerNorm", self.module)
        return self._lead(F.layer_norm(x, m.normalized_shape, None, None, m.eps))

    @override
    def errors(self, grad_out: Tensor, batch_size: int | None = None) -> Tensor:
        return self._lead(grad_out)


class RMSNormAdapter(LayerNormAdapter):
    """``RMSNorm``: ``x̂ = x/√(mean x² + ε)`` over ``normalized_shape``, no ``β``."""

    @override
    def normalised(self, x: Tensor) -> Tensor:
        m = cast("nn.RMSNorm", self.module)
        return self._lead(F.rms_norm(x, m.normalized_shape, None, m.eps))

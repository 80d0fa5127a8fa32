"""One forward and the needed backward passes on a batch -> per-layer inputs and errors."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvkit.capture.hooks import layer_errors, record
from curvkit.capture.inputs import OutputFn, batch_size, forward
from curvkit.capture.layers import LayerAdapter
from curvkit.capture.targets import output_seeds


@dataclass
class Captured:
    """Per-layer factors of ``F = G Gᵀ`` on one batch (math_spec §2).

    Attributes:
        layers: the tracked layers.
        a: per layer, inputs ``(N, T, d_in)`` (with a ones column for a selected bias).
        e: per layer, errors ``(N·R, T, d_out)`` with the Fisher scaling folded in, so that
            column ``m = n·R + r`` of ``G`` restricted to the layer is
            ``vec_r(Σ_t e_{mt} a_{nt}ᵀ)``.
        outputs: the model outputs ``(N, C)`` (detached).
        sampled: MC labels ``(S, N[, C])`` for ``kind="mc"``, else ``None``.
        kind, likelihood: what was captured.
    """

    layers: list[LayerAdapter]
    a: list[Tensor]
    e: list[Tensor]
    outputs: Tensor
    sampled: Tensor | None
    kind: str
    likelihood: str

    @property
    def num_data(self) -> int:
        return int(self.outputs.shape[0])

    @property
    def repeats(self) -> int:
        return int(self.e[0].shape[0] // self.outputs.shape[0])


def _warn_train_mode(model: nn.Module) -> None:
    coupled = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    if model.training and any(isinstance(m, coupled) for m in model.modules()):
        warnings.warn(
            "the model is in train mode and contains BatchNorm/Dropout: per-sample errors are "
            "then not per-sample gradients of a fixed function; call model.eval() before "
            "building curvature",
            stacklevel=3,
        )


def capture(
    model: nn.Module,
    inputs,
    layers: Sequence[LayerAdapter],
    targets: Tensor | None = None,
    *,
    likelihood: str = "classification",
    kind: str = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    output_fn: OutputFn | None = None,
) -> Captured:
    """Run one forward pass and ``R`` vector-Jacobian products from the outputs.

    ``R`` is ``C`` (exact), ``mc_samples`` (mc) or 1 (empirical); see
    :mod:`curvkit.capture.targets` for the seeds and their scaling. ``inputs`` is a tensor, a
    tuple or a dict and the output a tensor or an object with ``.logits`` (see
    :mod:`curvkit.capture.inputs`; ``output_fn`` maps other outputs to the logits).
    """
    batch_size(inputs)  # type and emptiness checks
    _warn_train_mode(model)
    with torch.enable_grad(), record(layers, keep_outputs=True) as rec:
        outputs = forward(model, inputs, output_fn)
        rec.check_complete(layers)
        seeds, sampled = output_seeds(outputs, targets, likelihood, kind, mc_samples, generator)
        errors = layer_errors(outputs, rec, layers, seeds.to(outputs.dtype))
    a = [x for x in rec.inputs]
    for layer, ai, ei in zip(layers, a, errors):
        if not (torch.isfinite(ai).all() and torch.isfinite(ei).all()):
            raise FloatingPointError(f"non-finite inputs or errors at layer {layer.describe()}")
    return Captured(list(layers), a, errors, outputs.detach(), sampled, kind, likelihood)

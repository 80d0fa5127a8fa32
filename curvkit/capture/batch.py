"""One forward and the needed backward passes on a batch -> per-layer inputs and errors."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from curvkit.capture.generic import GenericAdapter, generic_columns
from curvkit.capture.guard import verify_capture
from curvkit.capture.hooks import BackwardRoute, errors_by_backward, layer_errors, record
from curvkit.capture.inputs import OutputFn, batch_size, forward, input_tensors
from curvkit.capture.layers import LayerAdapter
from curvkit.capture.targets import num_loss_terms, output_seeds
from curvkit.linalg.finite import all_finite


@dataclass
class Captured:
    """Per-layer factors of ``F = G Gᵀ`` on one batch (Fisher of Benzing 2022, eq 1; App. I).

    Attributes:
        layers: the tracked layers.
        a: per layer, inputs ``(N, T, d_in)`` (with a ones column for a selected bias; ``1`` of
            shape ``(N, 1, 1)`` for explicit rules and the generic route; one-hot indices
            ``(N, T, 1)``, ``int64``, for rules with ``one_hot`` such as ``nn.Embedding``).
        e: per layer, errors ``(N·R, T, d_out)`` with the Fisher scaling folded in, so that
            column ``m = n·R + r`` of ``G`` restricted to the layer is
            ``vec_r(Σ_t e_{mt} a_{nt}ᵀ)`` (see :mod:`curvkit.capture.rules.base`).
        outputs: the model outputs ``(N, C)`` or ``(N, …, C)`` (detached).
        sampled: MC labels ``(S, N[, C])`` for ``kind="mc"``, else ``None``.
        kind, likelihood: what was captured.
        check: the guard's relative error per layer (``None`` when not checked).
        num_terms: ``N_ℓ``, the number of loss terms (positions; see
            :mod:`curvkit.capture.targets`).
    """

    layers: list[LayerAdapter]
    a: list[Tensor]
    e: list[Tensor]
    outputs: Tensor
    sampled: Tensor | None
    kind: str
    likelihood: str
    check: dict[str, float] | None = None
    num_terms: int | None = None

    @property
    def num_data(self) -> int:
        """``N``, the number of inputs in the batch."""
        return int(self.outputs.shape[0])

    @property
    def repeats(self) -> int:
        """``R``, error rows per input (``e`` has ``N·R`` rows)."""
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


def batch_coupled(model: nn.Module) -> bool:
    """Whether a forward couples the samples of a batch (a BatchNorm in train mode)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               for m in model.modules())


def check_grad_mode(inputs):
    """Refuse ``torch.inference_mode()``; return ``inputs`` usable in an autograd graph.

    Inference tensors are copied: they cannot be saved for backward.

    Raises:
        RuntimeError: called inside ``torch.inference_mode()``.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "curvkit cannot capture curvature inside torch.inference_mode(): it needs autograd "
            "(a forward graph and backward passes). Call it outside the inference_mode block "
            "(torch.no_grad() around it is fine)."
        )
    def usable(x):
        return x.clone() if isinstance(x, Tensor) and x.is_inference() else x

    if not any(x.is_inference() for x in input_tensors(inputs)):
        return inputs
    if isinstance(inputs, Mapping):
        return {k: usable(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(usable(v) for v in inputs)
    return usable(inputs)


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore every buffer a forward changes: capturing curvature leaves the model as it was.

    Those are train-mode BatchNorm running statistics and ``num_batches_tracked``.
    """
    saved = [(b, b._version, b.clone()) for m in model.modules() if m.training
             for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, version, copy in saved:
                if b._version != version or not torch.equal(b, copy):
                    b.copy_(copy)


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
    check: bool = True,
    ignore_index: int = -100,
    generic_route: str = "auto",
    generic_budget_gb: float | None = None,
) -> Captured:
    """Run one forward pass and ``R`` vector-Jacobian products from the outputs.

    ``R`` is ``C`` (exact; ``T·C`` for outputs ``(N, T, C)``), ``mc_samples`` (mc) or 1
    (empirical); see :mod:`curvkit.capture.targets` for the seeds and their scaling. ``inputs`` is
    a tensor, a tuple or a dict and the output a tensor or an object with ``.logits`` (see
    :mod:`curvkit.capture.inputs`; ``output_fn`` maps other outputs to the logits). Layers with
    a rule are recorded by hooks in that pass; the generic adapters get their explicit columns
    from the same seeds by ``torch.func`` (:mod:`curvkit.capture.generic`). The model's buffers
    are left unchanged.

    Args:
        model: the network.
        inputs: the batch's model inputs (tensor, tuple or dict).
        layers: the layer adapters to capture.
        targets: data labels (needed for ``kind="empirical"``; mark ignored positions).
        likelihood: ``"classification"``, ``"regression"`` (unit variance) or ``"binary"``.
        kind: ``"exact"`` (expectation over ``y ∼ p``), ``"mc"`` (``mc_samples`` sampled labels
            per input, also ÷S) or ``"empirical"`` (data labels); each Fisher is the mean over
            the ``N_ℓ`` loss terms (table in :mod:`curvkit.capture.targets`).
        mc_samples: ``S``, labels drawn per input for ``kind="mc"``.
        generator: the randomness of the MC labels.
        output_fn: maps the model output to the logits.
        check: verify the captured factors against autograd on the same batch (one extra
            backward, :func:`~curvkit.capture.guard.verify_capture`).
        ignore_index: classification target value of positions that are no loss term.
        generic_route: the generic route, see :func:`curvkit.capture.generic.generic_columns`.
        generic_budget_gb: its memory limit, see :func:`curvkit.capture.generic.generic_columns`.

    Returns:
        The :class:`Captured` factors, the Fisher scaling (``1/√N_ℓ``, ``1/√S``, ``√p``) folded
        into the errors ``e``.

    Raises:
        CaptureMismatchError: ``check`` found a layer whose capture does not match autograd.
        RuntimeError: inside ``torch.inference_mode()``, or a tracked layer was not called.
    """
    sampled: list[Tensor | None] = [None]

    def seeds_of(outputs: Tensor) -> Tensor:
        seeds, sampled[0] = output_seeds(outputs, targets, likelihood, kind, mc_samples,
                                         generator, ignore_index)
        return seeds

    outputs, a, e, report = capture_columns(model, inputs, layers, seeds_of, generic_route,
                                            generic_budget_gb, output_fn, check)
    terms = num_loss_terms(outputs, targets, likelihood, ignore_index)
    return Captured(list(layers), a, e, outputs, sampled[0], kind, likelihood, report, terms)


def capture_columns(
    model: nn.Module,
    inputs: Any,
    layers: Sequence[LayerAdapter],
    seeds_of: Callable[[Tensor], Tensor],
    generic_route: str = "auto",
    generic_budget_gb: float | None = None,
    output_fn: OutputFn | None = None,
    check: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor], dict[str, float] | None]:
    """One forward pass, then the columns ``∂⟨σ_m, f⟩/∂θ`` of every layer in ``(a, e)`` form.

    Args:
        model: the network.
        inputs: the batch's model inputs.
        layers: the adapters.
        seeds_of: ``outputs -> seeds (N, R, *outputs.shape[1:])`` (scaling folded in).
        generic_route: see :func:`curvkit.capture.generic.generic_columns`.
        generic_budget_gb: see :func:`curvkit.capture.generic.generic_columns`.
        output_fn: maps the model output to the logits (see :mod:`curvkit.capture.inputs`).
        check: run the capture guard on every layer (rules and generic route).

    Returns:
        ``(outputs detached, a per layer, e per layer, guard report or None)`` in layer order.
    """
    N = batch_size(inputs)  # type and emptiness checks
    inputs = check_grad_mode(inputs)
    _warn_train_mode(model)
    hooked = [layer for layer in layers if layer.hooked]
    generic = cast("list[GenericAdapter]", [layer for layer in layers if not layer.hooked])
    with torch.enable_grad(), buffers_kept(model):
        with record(hooked, keep_outputs=True, batch_size=N) as rec:
            outputs = forward(model, inputs, output_fn)
            rec.check_complete(hooked)
            recorded = cast("list[Tensor]", rec.inputs)  # check_complete: every input recorded
            seeds = seeds_of(outputs).to(outputs.dtype)
            route = None
            if hooked and any(rec.ungraphed):  # reentrant checkpointing: only .backward() reaches
                route = BackwardRoute(rec, [*model.parameters(), *input_tensors(inputs)])
                errors = errors_by_backward(outputs, rec, hooked, seeds, route)
            else:
                errors = layer_errors(outputs, rec, hooked, seeds) if hooked else []
        pairs = {id(layer): layer.combine(ai, ei)
                 for layer, ai, ei in zip(hooked, recorded, errors)}
        # outside the hooks: the generic route's own forwards are no uses of the hooked layers
        for g_layer, ei in zip(generic, generic_columns(model, inputs, generic, seeds,
                                                        generic_route, generic_budget_gb,
                                                        output_fn)):
            pairs[id(g_layer)] = (torch.ones(N, 1, 1, dtype=ei.dtype, device=ei.device), ei)
        a = [pairs[id(layer)][0] for layer in layers]
        e = [pairs[id(layer)][1] for layer in layers]
        for layer, ai, ei in zip(layers, a, e):
            if not (all_finite(ai) and all_finite(ei)):
                raise FloatingPointError(f"non-finite inputs or errors at layer {layer.describe()}")
        backward = None if route is None else \
            (lambda v: (route.run(outputs, v), route.leaf_grads)[1])
        report = verify_capture(layers, a, e, outputs, seeds, retain_graph=False,
                                per_sample=not batch_coupled(model), backward=backward) \
            if check else None
    return outputs.detach(), a, e, report


def capture_inputs(model: nn.Module, inputs, layers: Sequence[LayerAdapter], *,
                   check: bool = True, output_fn: OutputFn | None = None) -> list[Tensor]:
    """Layer inputs ``a`` from one forward pass (all FOOF's ``I ⊗ Â`` needs).

    Without ``check`` the forward runs under ``torch.no_grad()``; with it, it runs with autograd
    and the capture guard back-propagates one random seed per input to verify the layer rules
    (two extra backwards). Buffers are left unchanged.
    """
    N = batch_size(inputs)
    inputs = check_grad_mode(inputs)
    with torch.set_grad_enabled(check), buffers_kept(model), \
            record(layers, keep_outputs=check, batch_size=N) as rec:
        outputs = forward(model, inputs, output_fn)
        rec.check_complete(layers)
        recorded = cast("list[Tensor]", rec.inputs)  # check_complete: every input recorded
        for layer, a in zip(layers, recorded):
            if not all_finite(a):
                raise FloatingPointError(f"non-finite inputs at layer {layer.describe()}")
        if check:
            gen = torch.Generator(device=outputs.device).manual_seed(0)
            flat = outputs.reshape(outputs.shape[0], -1)
            seeds = torch.randn(flat.shape[0], 1, flat.shape[1], generator=gen,
                                device=flat.device, dtype=flat.dtype)
            if any(rec.ungraphed):  # reentrant checkpointing (see capture)
                route = BackwardRoute(rec, [*model.parameters(), *input_tensors(inputs)])
                errors = errors_by_backward(flat, rec, layers, seeds, route)
                backward = lambda v: (route.run(flat, v), route.leaf_grads)[1]  # noqa: E731
            else:
                errors, backward = layer_errors(flat, rec, layers, seeds), None
            verify_capture(layers, recorded, errors, flat, seeds, retain_graph=False,
                           per_sample=not batch_coupled(model), backward=backward)
    return list(recorded)

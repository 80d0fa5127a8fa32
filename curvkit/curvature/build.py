"""``curvkit.fisher``: the public builder and the registry of structures.

A structure is a function ``builder(ctx, **options) -> LinearOperator`` (layer space) registered
with :func:`register_structure`. New structures (``"kfac"``, ``"foof"``, ``"diag"``, ...) register
themselves without touching this file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn

from curvkit.capture import (
    KINDS,
    LIKELIHOODS,
    Captured,
    LayerAdapter,
    capture,
    find_layers,
)
from curvkit.capture.targets import check_choice
from curvkit.curvature.base import Curvature
from curvkit.linalg import LinearOperator

Builder = Callable[..., LinearOperator]
_STRUCTURES: dict[str, Builder] = {}


_LOSS_FREE: set[str] = set()


def register_structure(name: str, uses_loss: bool = True) -> Callable[[Builder], Builder]:
    """Register ``builder(ctx: BuildContext, **options) -> LinearOperator`` under ``name``.

    Args:
        name: the ``structure=`` value.
        uses_loss: ``False`` for structures that do not depend on the loss or labels (FOOF's
            ``I ⊗ Â``); their :class:`Curvature` then reports ``kind=None``.
    """

    def deco(fn: Builder) -> Builder:
        _STRUCTURES[name] = fn
        if not uses_loss:
            _LOSS_FREE.add(name)
        return fn

    return deco


def structures() -> tuple[str, ...]:
    """Names of the registered structures."""
    return tuple(_STRUCTURES)


@dataclass
class BuildContext:
    """Everything a structure builder may need; ``captured`` runs the capture lazily."""

    model: nn.Module
    inputs: Tensor
    targets: Tensor | None
    likelihood: str
    kind: str
    mc_samples: int
    generator: torch.Generator | None
    params: list[nn.Parameter]
    layers: list[LayerAdapter]
    extra: dict = field(default_factory=dict)

    @cached_property
    def captured(self) -> Captured:
        return capture(
            self.model, self.inputs, self.layers, self.targets, likelihood=self.likelihood,
            kind=self.kind, mc_samples=self.mc_samples, generator=self.generator,
        )

    @property
    def num_data(self) -> int:
        return int(self.inputs.shape[0])


def layer_index(params: Sequence[nn.Parameter], layers: Sequence[LayerAdapter]) -> Tensor | None:
    """Flat-vector positions of the layer-space layout (see :class:`Curvature`).

    Returns ``None`` when the layout is the identity (layers in parameter order, and no layer
    whose ``[W | b]`` rows interleave weight and bias), so no ``P``-sized index is built.
    """
    order = []
    interleaved = False
    for layer in layers:
        if layer.weight:
            order.append(id(layer.module.weight))
        if layer.bias:
            order.append(id(layer.module.bias))
        interleaved |= layer.weight and layer.bias and layer.d_out > 1
    if not interleaved and order == [id(p) for p in params]:
        return None
    offsets, off = {}, 0
    for p in params:
        offsets[id(p)] = off
        off += p.numel()
    return torch.cat([layer.layer_index(offsets) for layer in layers])


def resolve_params(model: nn.Module, params) -> list[nn.Parameter]:
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    if not params:
        raise ValueError("no parameters to build curvature for (none require grad)")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise TypeError(f"all params must share one dtype and device, got {dtypes} on {devices}")
    return params


def fisher(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None = None,
    *,
    likelihood: str = "classification",
    kind: str = "exact",
    structure: str = "full",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    params: Sequence[nn.Parameter] | None = None,
    **options,
) -> Curvature:
    """Fisher information of ``model`` on the batch ``inputs`` as a :class:`Curvature`.

    With ``g = ∇θ(−log p(y|xₙ, θ))`` and ``N = len(inputs)``:

    * ``kind="exact"``: ``F = (1/N) Σₙ E_{y∼p(·|xₙ)}[g gᵀ]`` (all labels weighted by the model's
      probabilities, through the loss-Hessian square root; one forward, ``C`` backward seeds);
    * ``kind="mc"``: ``F = (1/(N·S)) Σₙ Σₛ g(ŷₙₛ) g(ŷₙₛ)ᵀ`` with ``ŷ ∼ p(·|xₙ)``,
      ``S = mc_samples``, randomness only from ``generator``;
    * ``kind="empirical"``: ``F = (1/N) Σₙ g(yₙ) g(yₙ)ᵀ`` with the data labels ``targets``.

    Args:
        model: a network of supported layers (``nn.Linear``, ``nn.Conv2d``) and parameter-free
            modules; its output must be ``(N, C)``.
        inputs: the batch.
        targets: data labels (needed for ``"empirical"``).
        likelihood: ``"classification"`` (softmax categorical), ``"regression"`` (Gaussian,
            unit variance: ``−log p = ½‖f(x)−y‖²``) or ``"binary"`` (Bernoulli on logits).
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        structure: ``"full"`` (Woodbury form, exact), ``"block_diag"`` (per-layer Woodbury),
            or any registered structure (see :func:`structures`).
        mc_samples: ``S`` for ``kind="mc"``.
        generator: the ``torch.Generator`` for MC sampling.
        params: parameters to build curvature for (default: all with ``requires_grad``).
        **options: structure-specific options (e.g. ``route`` for ``"full"``).

    Returns:
        A :class:`Curvature` with ``@``, ``solve(v, damping)``, ``inverse``, ``logdet``,
        ``to_dense`` and ``to_scipy``.
    """
    check_choice(likelihood, LIKELIHOODS, "likelihood")
    check_choice(kind, KINDS, "kind")
    check_choice(structure, structures(), "structure")
    params = resolve_params(model, params)
    if inputs.device != params[0].device:
        raise ValueError(f"inputs are on {inputs.device} but the parameters on {params[0].device}")
    if inputs.is_floating_point() and inputs.dtype != params[0].dtype:
        raise TypeError(f"inputs have dtype {inputs.dtype} but the parameters {params[0].dtype}")
    layers = find_layers(model, params)
    ctx = BuildContext(model, inputs, targets, likelihood, kind, mc_samples, generator, params,
                       layers)
    op = _STRUCTURES[structure](ctx, **options)
    captured = ctx.__dict__.get("captured")
    return Curvature(
        op, params, layers, layer_index(params, layers),
        kind=None if structure in _LOSS_FREE else kind, likelihood=likelihood,
        structure=structure, num_data=ctx.num_data, captured=captured,
        info={"rank": getattr(op, "rank", None)},
    )

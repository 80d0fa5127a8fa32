"""``curvkit.fisher``: the public builder and the registry of structures.

A structure is a function ``builder(ctx, **options) -> LinearOperator`` (layer space) registered
with :func:`register_structure`. New structures (``"kfac"``, ``"foof"``, ``"diag"``, ...) register
themselves without touching this file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.capture import (
    KINDS,
    LIKELIHOODS,
    Captured,
    LayerAdapter,
    batch_size,
    capture,
    check_model,
    eager_module,
    input_tensors,
)
from curvkit.capture.inputs import LABEL_KEY, OutputFn
from curvkit.capture.layers import find_rules
from curvkit.capture.targets import check_choice
from curvkit.curvature.base import Curvature
from curvkit.linalg import LinearOperator
from curvkit.typing import Kind, Likelihood, Structure

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
    """Everything a structure builder may need; ``captured`` runs the capture lazily.

    ``inputs`` are the model inputs of one batch (a tensor, tuple or dict, see
    :mod:`curvkit.capture.inputs`); ``output_fn`` maps the model output to the logits.
    """

    model: nn.Module
    inputs: Any
    targets: Tensor | None
    likelihood: str
    kind: str
    mc_samples: int
    generator: torch.Generator | None
    params: list[nn.Parameter]
    layers: list[LayerAdapter]
    extra: dict = field(default_factory=dict)
    output_fn: OutputFn | None = None
    check: bool = True
    ignore_index: int = -100

    @cached_property
    def captured(self) -> Captured:
        """The capture of the batch (per-layer inputs and Fisher errors), computed on first use."""
        return capture(
            self.model, self.inputs, self.layers, self.targets, likelihood=self.likelihood,
            kind=self.kind, mc_samples=self.mc_samples, generator=self.generator,
            output_fn=self.output_fn, check=self.check, ignore_index=self.ignore_index,
            **self.extra,
        )

    @property
    def num_data(self) -> int:
        """``N``, the number of data in the batch."""
        return batch_size(self.inputs)


def layer_index(params: Sequence[nn.Parameter],
                layers: Sequence[LayerAdapter]) -> list[Tensor | tuple[int, int]] | None:
    """Flat-vector positions of the layer-space layout (see :class:`Curvature`), per layer.

    Returns ``None`` when the layout is the identity (every layer block is the next slice of the
    flat vector, see :meth:`LayerAdapter.span`); otherwise one entry per layer: its flat
    ``(start, stop)`` slice when it has one, else its positions. No ``P``-sized index is built
    (:class:`~curvkit.curvature.permutation.LayerPermutation` makes one only if asked).
    """
    offsets, off = {}, 0
    for p in params:
        offsets[id(p)] = off
        off += p.numel()
    pos = 0
    for layer in layers:
        span = layer.span(offsets)
        if span is None or span[0] != pos:
            break
        pos = span[1]
    else:
        if pos == off:
            return None
    parts: list[Tensor | tuple[int, int]] = []
    for layer in layers:  # contiguous blocks as a slice; only the others index entry by entry
        span = layer.span(offsets)
        parts.append(span if span is not None else layer.layer_index(offsets))
    return parts


def resolve_params(model: nn.Module, params) -> list[nn.Parameter]:
    """The parameters a curvature is built for.

    Args:
        model: the network.
        params: an iterable of its parameters, or ``None`` for every parameter that requires grad.

    Returns:
        The parameters as a list.

    Raises:
        ValueError: no parameters.
        TypeError: the parameters do not share one dtype and device.
    """
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


def check_inputs(inputs: Any, params: Sequence[nn.Parameter]) -> None:
    """Every input tensor on the parameters' device; floating ones in their dtype."""
    for x in input_tensors(inputs):
        if x.device != params[0].device:
            raise ValueError(f"inputs are on {x.device} but the parameters on {params[0].device}")
        if x.is_floating_point() and x.dtype != params[0].dtype:
            raise TypeError(f"inputs have dtype {x.dtype} but the parameters {params[0].dtype}")


def fisher(
    model: nn.Module,
    batch: Any,
    targets: Tensor | None = None,
    *,
    likelihood: Likelihood = "classification",
    kind: Kind = "exact",
    structure: Structure = "full",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    params: Sequence[nn.Parameter] | None = None,
    output_fn: OutputFn | None = None,
    label_key: str = LABEL_KEY,
    progress: bool | None = None,
    subsample: int | None = None,
    subsample_generator: torch.Generator | None = None,
    column_budget_gb: float | None = None,
    check: bool = True,
    distributed_columns: str = "shard",
    ignore_index: int = -100,
    **options,
) -> Curvature:
    """Fisher information of ``model`` on ``batch`` (one batch or an iterable of batches).

    With ``g = ∇θ(−log p(y|xₙ, θ))`` and ``N`` the number of data (all batches together):

    * ``kind="exact"``: ``F = (1/N) Σₙ E_{y∼p(·|xₙ)}[g gᵀ]`` (all labels weighted by the model's
      probabilities, through the loss-Hessian square root; one forward, ``C`` backward seeds);
    * ``kind="mc"``: ``F = (1/(N·S)) Σₙ Σₛ g(ŷₙₛ) g(ŷₙₛ)ᵀ`` with ``ŷ ∼ p(·|xₙ)``,
      ``S = mc_samples``, randomness only from ``generator``;
    * ``kind="empirical"``: ``F = (1/N) Σₙ g(yₙ) g(yₙ)ᵀ`` with the data labels ``targets``.

    **Data.** ``batch`` is one batch -- a tensor ``x`` (``model(x)``), a dict (``model(**batch)``,
    e.g. a Hugging Face ``BatchEncoding``; a ``"labels"`` entry is taken as the targets), or a
    data-loader tuple ``(inputs, targets)`` -- or an *iterable of batches* (a ``DataLoader``, a
    generator, a list of such tuples/dicts), each batch of any size. ``N`` is the leading dimension
    of the first input tensor (rules in :mod:`curvkit.capture.inputs`). The model output is a
    tensor, an object with ``.logits`` (Hugging Face ``ModelOutput``), or mapped by ``output_fn``.

    **Iterables of batches** give the Fisher of the *union*, ``F = (1/N) Σ`` over all ``N`` data,
    the same as one batch holding all of them (see :mod:`curvkit.curvature.data`): ``"kfac"``,
    ``"foof"``, ``"diag"`` accumulate their factors exactly (the KFAC of the union -- ``Â`` and
    ``B̂`` summed over batches before the Kronecker product, not a sum of per-batch Kronecker
    products); ``"full"`` / ``"block_diag"`` accumulate ``U Uᵀ`` (primal route, small ``P``) or
    keep the Woodbury columns of all batches within ``column_budget_gb`` (``MemoryError`` with
    the GB estimate beyond it; ``subsample=k`` keeps ``k`` data chosen uniformly at random by
    ``subsample_generator``). With an initialised ``torch.distributed`` process group each rank
    passes its shard and gets the curvature of the union of all ranks' data.

    Args:
        model: an ``nn.Module``: layers with a rule (:mod:`curvkit.capture.rules`) are captured
            by hooks, every other parameter by the generic ``torch.func`` route; its logits are
            ``(N, C)`` or ``(N, …, C)`` (class dimension last, every position a loss term; the
            Fisher is then the mean per loss term, see :mod:`curvkit.capture.targets`).
        batch: one batch or an iterable of batches (see above).
        targets: data labels of a single batch (needed for ``"empirical"``; with a tuple batch
            ``(x1, x2)`` and ``targets`` the tuple is passed positionally, ``model(x1, x2)``).
        likelihood: ``"classification"`` (softmax categorical), ``"regression"`` (Gaussian,
            unit variance: ``−log p = ½‖f(x)−y‖²``) or ``"binary"`` (Bernoulli on logits).
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        structure: ``"full"`` (Woodbury form, exact), ``"block_diag"`` (per-layer Woodbury),
            or any registered structure (see :func:`structures`).
        mc_samples: ``S`` for ``kind="mc"``.
        generator: the ``torch.Generator`` for MC sampling.
        params: parameters to build curvature for (default: all with ``requires_grad``).
        output_fn: maps the model output to the logits tensor (default: the tensor itself or
            its ``.logits``).
        label_key: the dict key of the labels in dict batches.
        progress: a tqdm progress bar over the batches (default: on for iterables of batches).
        subsample: iterables, ``"full"`` / ``"block_diag"``: keep the columns of ``k`` data drawn
            uniformly without replacement (``F ≈ (1/k) Σ`` over them, unbiased for the union).
        subsample_generator: the ``torch.Generator`` of ``subsample`` (required with it).
        column_budget_gb: iterables, ``"full"`` / ``"block_diag"``: the most memory the kept
            columns and their Gram may take (default: half the available memory).
        check: verify the capture against autograd on the same batch (the capture guard: for
            random weights ``w`` over the columns of ``G``, ``G w`` must equal the parameter
            gradient of ``Σ_m w_m ⟨σ_m, f(x)⟩``; one extra backward). ``False`` skips it.
        distributed_columns: with a ``torch.distributed`` group, ``"full"`` / ``"block_diag"``
            Woodbury columns stay with their ranks (``"shard"``: memory per rank shrinks,
            products are collective, ``captured`` is ``None``) or are all-gathered
            (``"gather"``: every rank holds all columns and the union ``captured``).
        ignore_index: classification target value of positions that are no loss term.
        **options: structure-specific options (e.g. ``route`` for ``"full"``), and for the
            generic route ``generic_route`` (``"auto"``, ``"vmap"``, ``"loop"``) and
            ``generic_budget_gb`` (memory limit of its explicit columns).

    Returns:
        A :class:`Curvature` with ``@``, ``solve(v, damping)``, ``inverse``, ``logdet``,
        ``to_dense`` and ``to_scipy``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; a batch or an output of unsupported type.
        ValueError: an empty batch, targets with the wrong number of rows, bad options.
        MemoryError: the kept Woodbury columns of an iterable exceed ``column_budget_gb``.
        CaptureMismatchError: the guard found a layer whose capture does not reproduce autograd
            (the message names the layer, its type and the relative error).
        UnsupportedLayerError: a parameter lives in a module curvkit cannot capture.
        RuntimeError: called inside ``torch.inference_mode()``.
    """
    from curvkit.curvature import data as _data  # the union over batches (imports this module)

    check_model(model)
    model = eager_module(model)
    check_choice(likelihood, LIKELIHOODS, "likelihood")
    check_choice(kind, KINDS, "kind")
    check_choice(structure, structures(), "structure")
    params = resolve_params(model, params)
    layers = find_rules(model, params)
    extra = {k: options.pop(k) for k in ("generic_route", "generic_budget_gb") if k in options}
    ctx = BuildContext(model, None, None, likelihood, kind, mc_samples, generator, params,
                       layers, extra, output_fn=output_fn, check=bool(check),
                       ignore_index=ignore_index)
    op, captured, num_data, info = _data.build(
        ctx, structure, _STRUCTURES[structure], batch, targets, label_key=label_key,
        progress=progress, subsample=subsample, subsample_generator=subsample_generator,
        column_budget_gb=column_budget_gb, options=options,
        distributed_columns=distributed_columns)
    return _snapshot(op, ctx, structure, captured, num_data, info)


def _snapshot(op: LinearOperator, ctx: BuildContext, structure: str, captured: Captured | None,
              num_data: int, info: dict) -> Curvature:
    """The :class:`Curvature` of a layer-space operator built from ``ctx``."""
    return Curvature(
        op, ctx.params, ctx.layers, layer_index(ctx.params, ctx.layers),
        kind=None if structure in _LOSS_FREE else ctx.kind, likelihood=ctx.likelihood,
        structure=structure, num_data=num_data, captured=captured,
        info={"rank": getattr(op, "rank", None), **info,
              **({"num_loss_terms": captured.num_terms}
                 if captured is not None and captured.num_terms is not None else {})},
    )


def from_captured(
    model: nn.Module,
    a: Sequence[Tensor],
    e: Sequence[Tensor],
    *,
    num_data: int,
    likelihood: Likelihood = "classification",
    kind: Kind = "exact",
    structure: Structure = "full",
    params: Sequence[nn.Parameter] | None = None,
    **options,
) -> Curvature:
    """The Curvature of stored per-layer inputs ``a`` and errors ``e``, through the same builder.

    For a capture kept from an earlier :func:`fisher` call (``F.captured.a``, ``F.captured.e``),
    e.g. an optimizer's state dict: the registered ``structure`` builder runs on them as if it
    had captured them, so the operator is the one :func:`fisher` returns (``"full"``:
    ``Woodbury`` on the stacked layer factors; ``"block_diag"``: one per layer; ``"kfac"``:
    ``B̂ ⊗ Â`` of the stored pair), with no forward or backward pass. ``F = G Gᵀ`` with column
    ``m = n·R + r`` of ``G`` restricted to layer ``l`` equal to ``vec_r(Σ_t e_{mt} a_{nt}ᵀ)``
    (Benzing 2022, App. E), the Fisher scaling already folded into ``e``.

    Args:
        model: the network the pair was captured from (its layers give the layout).
        a: per layer, inputs ``(N, T, d_in)``, in the layer order of :func:`fisher`.
        e: per layer, errors ``(N·R, T, d_out)``.
        num_data: ``N``, the number of data of the mean Fisher.
        likelihood: the likelihood the pair was captured with.
        kind: the Fisher kind the pair was captured with.
        structure: a registered structure that reads only ``ctx.captured``.
        params: the parameters (default: all with ``requires_grad``), as in :func:`fisher`.
        **options: structure options (e.g. ``route``).

    Returns:
        The :class:`Curvature`, with ``captured`` holding the pair.

    Raises:
        ValueError: the pair does not match the layers (count) or an unknown choice.
    """
    check_choice(likelihood, LIKELIHOODS, "likelihood")
    check_choice(kind, KINDS, "kind")
    check_choice(structure, structures(), "structure")
    params = resolve_params(model, params)
    layers = find_rules(model, params)
    if len(a) != len(layers) or len(e) != len(layers):
        raise ValueError(f"from_captured: {len(a)} inputs and {len(e)} errors for {len(layers)} "
                         "layers; pass F.captured.a and F.captured.e of a fisher() call on this "
                         "model and params")
    ctx = BuildContext(model, None, None, likelihood, kind, 1, None, params, layers)
    captured = Captured(layers, list(a), list(e), outputs=a[0].new_empty(int(num_data), 0),
                        sampled=None, kind=kind, likelihood=likelihood)
    ctx.__dict__["captured"] = captured  # the cached property: no capture runs
    op = _STRUCTURES[structure](ctx, **options)
    return _snapshot(op, ctx, structure, captured, int(num_data), {})

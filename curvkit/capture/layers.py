"""Per-layer adapters: map a supported module's inputs and output gradients to ``(a, e)``.

For every supported layer the weight (and bias) is seen as one ``d_out × d_in`` matrix
``W̃ = [W | b]`` acting on "locations" ``t``:

* ``nn.Linear`` on inputs ``(N, *, d)``: ``a_{nt}`` is the input row at location ``t`` (``T`` =
  product of the middle dimensions, 1 for plain ``(N, d)`` inputs);
* ``nn.Conv2d``: ``a_{nt}`` is the unfolded patch ``t`` (``d_in = C_in·k_h·k_w``, channel-major,
  matching ``weight.reshape(C_out, -1)``), ``T = H_out·W_out``; ``e_{nt}`` the output gradient
  at that location.

With a (trainable) bias a ones column is appended to ``a``. Only the selected parameters of a
layer enter: a frozen weight drops its columns, a frozen bias drops the ones column.

**Standard forward only.** These rules are the layers' own forward (``s = W̃ a`` at every
location); a subclass that overrides ``forward`` (e.g. standardises or rescales its weight)
would get wrong curvature, so :func:`check_fast_rule` refuses it.

**Batch dimension.** ``a`` and ``e`` are indexed by the sample ``n`` first. A Linear layer input
whose dimension 0 is not the batch size ``N`` but exactly one other (non-feature) dimension is
(sequence-first ``(T, N, d)``), has that dimension moved to the front; with no such dimension the
capture refuses (:class:`BatchLayoutError`). When dimension 0 and another both have size ``N``
dimension 0 is taken; the capture guard (:mod:`curvkit.capture.guard`) detects a wrong choice.

**Tied modules.** Modules of the same type holding the same parameter (``lin2.weight =
lin1.weight``) form one layer whose calls are extra locations (per-sample gradient = sum over
uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Module types whose parameters curvkit can capture.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


class UnsupportedLayerError(TypeError):
    """A trainable parameter lives in a module curvkit cannot capture."""


class BatchLayoutError(ValueError):
    """A layer input has no dimension that can be identified as the batch dimension."""


#: Methods that define the forward of each fast-rule type; a subclass overriding any of them
#: (or an instance with its own ``forward``) does not compute ``s = W̃ a``.
_FORWARD_METHODS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("forward",),
    nn.Conv2d: ("forward", "_conv_forward"),
}


def check_fast_rule(name: str, module: nn.Module) -> None:
    """Refuse a Linear/Conv2d whose forward is not the standard one (the fast rules assume it).

    This is the one place that decides whether a fast layer rule applies to ``module``.

    Raises:
        UnsupportedLayerError: ``module``'s class overrides ``forward`` (or ``_conv_forward``), or
            the instance has its own ``forward``; the message names the layer, its type and what
            to do.
    """
    for base, methods in _FORWARD_METHODS.items():
        if not isinstance(module, base):
            continue
        changed = [m for m in methods if getattr(type(module), m) is not getattr(base, m)
                   or m in module.__dict__]
        if changed:
            raise UnsupportedLayerError(
                f"Layer '{name or '<model>'}' ({type(module).__name__}) is a subclass of "
                f"nn.{base.__name__} that overrides {', '.join(changed)}; curvkit's fast "
                f"{base.__name__} rule assumes the standard forward and would give wrong "
                "curvature. Freeze its parameters (requires_grad_(False)), pass params=[...] "
                f"without them, or use a plain nn.{base.__name__}."
            )


@dataclass
class LayerAdapter:
    """One supported layer and which of its parameters are selected.

    Attributes:
        name: qualified module name in the model (``""`` for the model itself).
        module: the ``nn.Linear`` or ``nn.Conv2d``.
        weight: whether ``module.weight`` is among the selected parameters.
        bias: whether ``module.bias`` is among the selected parameters.
        tied: further modules of the same type holding the same parameters (their calls are
            extra uses of this layer), with their names in ``tied_names``.
    """

    name: str
    module: nn.Module
    weight: bool
    bias: bool
    tied: tuple[nn.Module, ...] = ()
    tied_names: tuple[str, ...] = ()

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """Every module whose calls are uses of this layer."""
        return (self.module, *self.tied)

    @property
    def d_out(self) -> int:
        return int(self.module.weight.shape[0])

    @property
    def d_w(self) -> int:
        """Number of weight columns (``d_in`` without the bias column)."""
        return int(math.prod(self.module.weight.shape[1:]))

    @property
    def d_in(self) -> int:
        """Columns of ``W̃``: weight columns if selected, plus one if the bias is selected."""
        return (self.d_w if self.weight else 0) + (1 if self.bias else 0)

    @property
    def size(self) -> int:
        return self.d_out * self.d_in

    def describe(self) -> str:
        tied = f", tied with {', '.join(repr(n) for n in self.tied_names)}" if self.tied else ""
        return f"'{self.name or '<model>'}' ({type(self.module).__name__}{tied})"

    def _batch_first(self, x: Tensor, batch_size: int | None, what: str) -> Tensor:
        """Move the batch dimension of a layer input/output gradient to the front."""
        if batch_size is None or x.dim() < 2 or x.shape[0] == batch_size:
            return x
        if isinstance(self.module, nn.Linear):
            dims = [k for k in range(1, x.dim() - 1) if x.shape[k] == batch_size]
            if len(dims) == 1:
                return x.movedim(dims[0], 0)
        raise BatchLayoutError(
            f"Layer {self.describe()} got a {what} of shape {tuple(x.shape)} in which the batch "
            f"size N = {batch_size} is not dimension 0"
            + (" nor exactly one other dimension" if isinstance(self.module, nn.Linear) else "")
            + "; curvkit needs per-sample layer inputs. Feed the layer batch-first inputs "
            "(e.g. batch_first=True), or freeze its parameters."
        )

    def inputs(self, x: Tensor, module: nn.Module | None = None,
               batch_size: int | None = None) -> Tensor:
        """Layer input -> ``a`` of shape ``(N, T, d_in)`` (patches, weight/bias columns).

        Args:
            x: the input of one call.
            module: the module that was called (one of :attr:`modules`; default the first).
            batch_size: ``N``, to locate the batch dimension (default: dimension 0).
        """
        m = self.module if module is None else module
        x = x.detach()
        if isinstance(m, nn.Conv2d):
            if x.dim() == 3:
                x = x.unsqueeze(0)
            x = self._batch_first(x, batch_size, "input")
            a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            a = a.transpose(1, 2)  # (N, T, C_in·kh·kw)
        elif x.dim() > 1:
            x = self._batch_first(x, batch_size, "input")
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        else:
            a = x.reshape(1, 1, -1)
        cols = [a] if self.weight else []
        if self.bias:
            cols.append(torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device))
        return torch.cat(cols, dim=2) if len(cols) > 1 else cols[0]

    def errors(self, grad_out: Tensor, batch_size: int | None = None) -> Tensor:
        """Gradient w.r.t. the layer output -> ``e`` of shape ``(N, T, d_out)``.

        ``batch_size`` locates the batch dimension as in :meth:`inputs`.
        """
        if isinstance(self.module, nn.Conv2d):
            if grad_out.dim() == 3:
                grad_out = grad_out.unsqueeze(0)
            grad_out = self._batch_first(grad_out, batch_size, "output gradient")
            N, C = grad_out.shape[:2]
            return grad_out.reshape(N, C, -1).transpose(1, 2)
        if grad_out.dim() < 2:
            return grad_out.reshape(1, 1, -1)
        grad_out = self._batch_first(grad_out, batch_size, "output gradient")
        return grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])

    def check(self) -> None:
        """Raise for configurations the adapter cannot represent exactly."""
        for m in self.modules:
            self._check_module(m)

    def _check_module(self, m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise UnsupportedLayerError(
                    f"Layer {self.describe()} has groups={m.groups}; curvkit supports Conv2d with "
                    "groups=1 only. Freeze its parameters (requires_grad_(False)) or exclude them "
                    "with params=..."
                )
            if m.padding_mode != "zeros":
                raise UnsupportedLayerError(
                    f"Layer {self.describe()} uses padding_mode={m.padding_mode!r}; curvkit "
                    "supports 'zeros' only. Freeze its parameters or exclude them with params=..."
                )
            if isinstance(m.padding, str):
                raise UnsupportedLayerError(
                    f"Layer {self.describe()} uses padding={m.padding!r}; pass explicit integer "
                    "padding"
                )

    def layer_index(self, offsets: dict[int, int]) -> Tensor:
        """Positions in the flat parameter vector of ``vec_r(W̃)``, row-major ``(d_out, d_in)``.

        Args:
            offsets: ``id(param) -> offset`` of each selected parameter in the flat vector.
        """
        m = self.module
        idx = []
        if self.weight:
            w0 = offsets[id(m.weight)]
            idx.append(w0 + torch.arange(self.d_out * self.d_w).reshape(self.d_out, self.d_w))
        if self.bias:
            idx.append(offsets[id(m.bias)] + torch.arange(self.d_out).reshape(self.d_out, 1))
        return torch.cat(idx, dim=1).reshape(-1)


def _supported_names() -> str:
    return ", ".join(t.__name__ for t in SUPPORTED_LAYERS)


def find_layers(model: nn.Module, params: list[nn.Parameter]) -> list[LayerAdapter]:
    """Group ``params`` by their owning supported layer, in model order.

    Modules of the same supported type that hold the same selected parameter (weight tying) form
    one layer; their calls are uses of it (see the module docstring).

    Raises:
        UnsupportedLayerError: a parameter belongs to a module that is not supported, to a
            subclass with its own forward (:func:`check_fast_rule`), or is tied between modules
            of different types or with different biases (the message names the modules, their
            types and how to exclude them).
        ValueError: a parameter is not part of ``model`` or is listed twice.
    """
    ids = [id(p) for p in params]
    if len(set(ids)) != len(ids):
        raise ValueError("params lists the same parameter twice")
    wanted = set(ids)
    owned: list[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]] = []
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules():
        own = [(pn, p) for pn, p in module.named_parameters(recurse=False) if id(p) in wanted]
        if own:
            owned.append((name, module, own))
            for pn, p in own:
                owners.setdefault(id(p), []).append((name, module, pn))
    _check_ties(owners)
    found: set[int] = set()
    layers: list[LayerAdapter] = []
    placed: dict[int, LayerAdapter] = {}  # id(module) -> its layer (tied modules share one)
    for name, module, own in owned:
        if not isinstance(module, SUPPORTED_LAYERS):
            pn = own[0][0]
            full = f"{name}.{pn}" if name else pn
            raise UnsupportedLayerError(
                f"Unsupported layer '{name or '<model>'}' ({type(module).__name__}) holds the "
                f"trainable parameter '{full}'; supported layers: {_supported_names()}. Freeze its "
                "parameters (requires_grad_(False)) or pass params=[...] without them."
            )
        check_fast_rule(name, module)
        for pn, p in own:
            if pn not in ("weight", "bias"):
                raise UnsupportedLayerError(
                    f"Parameter '{name}.{pn}' of {type(module).__name__} is not a weight or bias"
                )
            found.add(id(p))
        if id(module) in placed:
            continue
        tied = [(n, m) for pn, p in own for n, m, _ in owners[id(p)] if m is not module]
        tied = list({id(m): (n, m) for n, m in tied}.values())
        layer = LayerAdapter(
            name=name,
            module=module,
            weight=id(module.weight) in wanted,
            bias=module.bias is not None and id(module.bias) in wanted,
            tied=tuple(m for _, m in tied),
            tied_names=tuple(n for n, _ in tied),
        )
        layer.check()
        for m in layer.modules:
            placed[id(m)] = layer
        layers.append(layer)
    missing = wanted - found
    if missing:
        raise ValueError(f"{len(missing)} of the given params are not parameters of the model")
    return layers


def _check_ties(owners: dict[int, list[tuple[str, nn.Module, str]]]) -> None:
    """Ties are supported between modules of one supported type sharing all selected params."""
    for uses in owners.values():
        if len(uses) < 2:
            continue
        (_, m0, p0), others = uses[0], uses[1:]
        desc = " and ".join(f"'{n or '<model>'}.{pn}' ({type(m).__name__})" for n, m, pn in uses)
        if any(type(m) is not type(m0) or pn != p0 for _, m, pn in others) \
                or not isinstance(m0, SUPPORTED_LAYERS):
            raise UnsupportedLayerError(
                f"A trainable parameter is tied between {desc}; curvkit captures ties only "
                f"between modules of one supported type ({_supported_names()}) that share the "
                "same parameters (a tie between different layer types, e.g. an Embedding and a "
                "Linear head, needs a rule for each). Untie them, or freeze the parameter "
                "(requires_grad_(False))."
            )
        for _, m, _ in others:
            for pn in ("weight", "bias"):
                a, b = getattr(m0, pn, None), getattr(m, pn, None)
                if a is not b and any(t is not None and t.requires_grad for t in (a, b)):
                    raise UnsupportedLayerError(
                        f"Modules {desc} share a parameter but have different '{pn}' tensors; "
                        "curvkit captures tied modules as one layer [W | b] and needs all their "
                        "trainable parameters shared. Share the bias too, drop it (bias=False), "
                        "or freeze the unshared one."
                    )

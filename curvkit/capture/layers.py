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


@dataclass
class LayerAdapter:
    """One supported layer and which of its parameters are selected.

    Attributes:
        name: qualified module name in the model (``""`` for the model itself).
        module: the ``nn.Linear`` or ``nn.Conv2d``.
        weight: whether ``module.weight`` is among the selected parameters.
        bias: whether ``module.bias`` is among the selected parameters.
    """

    name: str
    module: nn.Module
    weight: bool
    bias: bool

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
        return f"'{self.name or '<model>'}' ({type(self.module).__name__})"

    def inputs(self, x: Tensor) -> Tensor:
        """Layer input -> ``a`` of shape ``(N, T, d_in)`` (patches, weight/bias columns)."""
        m = self.module
        x = x.detach()
        if isinstance(m, nn.Conv2d):
            if x.dim() == 3:
                x = x.unsqueeze(0)
            a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            a = a.transpose(1, 2)  # (N, T, C_in·kh·kw)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, 1, -1)
        cols = [a] if self.weight else []
        if self.bias:
            cols.append(torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device))
        return torch.cat(cols, dim=2) if len(cols) > 1 else cols[0]

    def errors(self, grad_out: Tensor) -> Tensor:
        """Gradient w.r.t. the layer output -> ``e`` of shape ``(N, T, d_out)``."""
        if isinstance(self.module, nn.Conv2d):
            if grad_out.dim() == 3:
                grad_out = grad_out.unsqueeze(0)
            N, C = grad_out.shape[:2]
            return grad_out.reshape(N, C, -1).transpose(1, 2)
        return grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])

    def check(self) -> None:
        """Raise for configurations the adapter cannot represent exactly."""
        m = self.module
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

    Raises:
        UnsupportedLayerError: a parameter belongs to a module that is not supported (the
            message names the module, its type, the supported types and how to exclude it).
        ValueError: a parameter is not part of ``model`` or is listed twice.
    """
    ids = [id(p) for p in params]
    if len(set(ids)) != len(ids):
        raise ValueError("params lists the same parameter twice")
    wanted = set(ids)
    found: set[int] = set()
    layers: list[LayerAdapter] = []
    for name, module in model.named_modules():
        own = [(pn, p) for pn, p in module.named_parameters(recurse=False) if id(p) in wanted]
        if not own:
            continue
        if not isinstance(module, SUPPORTED_LAYERS):
            pn = own[0][0]
            full = f"{name}.{pn}" if name else pn
            raise UnsupportedLayerError(
                f"Unsupported layer '{name or '<model>'}' ({type(module).__name__}) holds the "
                f"trainable parameter '{full}'; supported layers: {_supported_names()}. Freeze its "
                "parameters (requires_grad_(False)) or pass params=[...] without them."
            )
        for pn, p in own:
            if pn not in ("weight", "bias"):
                raise UnsupportedLayerError(
                    f"Parameter '{name}.{pn}' of {type(module).__name__} is not a weight or bias"
                )
            found.add(id(p))
        layer = LayerAdapter(
            name=name,
            module=module,
            weight=id(module.weight) in wanted,
            bias=module.bias is not None and id(module.bias) in wanted,
        )
        layer.check()
        layers.append(layer)
    missing = wanted - found
    if missing:
        raise ValueError(f"{len(missing)} of the given params are not parameters of the model")
    return layers

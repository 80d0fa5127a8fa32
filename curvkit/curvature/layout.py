"""The layer-space block ``W̃_l`` of one layer, from and to tensors shaped like its parameters.

Every curvkit structure works in *layer space* (see :class:`~curvkit.curvature.Curvature`):
layer ``l`` occupies ``vec_r(W̃_l)``, a ``d_out × d_in`` matrix read row-major. For the layers the
optimizers precondition (``Linear``, ``Conv1d/2d/3d`` with ``groups=1``; Benzing 2022, eq 2 and
App. E) it is ``W̃_l = [W_l.reshape(d_out, -1) | b_l]``, the bias as the last column. Other
layers (per-group convolution blocks, transposed convolutions, explicit rules, the generic
route) place their entries by :meth:`~curvkit.capture.LayerAdapter.layer_index`, the one
definition of the layout that :class:`~curvkit.curvature.Curvature` uses too.

:class:`BlockLayout` is the one conversion the applications share (optimizers, EWC, validate):
``block(tensors)`` (differentiable) and ``split(matrix)``; it holds plain data only, so it
outlives the module objects (EWC checks a reloaded model against it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvkit.capture import LayerAdapter, find_rules

__all__ = ["BlockLayout", "model_layers"]


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Where the entries of one layer's ``d_out × d_in`` block ``W̃`` live in its parameters.

    Attributes:
        name: the layer's module name (``""`` for the model itself).
        d_out: rows of ``W̃``.
        d_in: columns of ``W̃`` (a selected bias counts as one column).
        shapes: shapes of the layer's selected parameters, in
            :meth:`~curvkit.capture.LayerAdapter.parameters` order (weight first, then bias).
        weight: whether the first parameter is the weight of a standard layer.
        bias: whether the last parameter is the bias of a standard layer.
        index: ``None`` for the standard layout ``[W.reshape(d_out, -1) | b]``; otherwise the
            positions of the ``d_out·d_in`` row-major block entries in the concatenation of the
            flattened parameters.
    """

    name: str
    d_out: int
    d_in: int
    shapes: tuple[tuple[int, ...], ...]
    weight: bool = False
    bias: bool = False
    index: Tensor | None = None

    @classmethod
    def of(cls, layer: LayerAdapter) -> BlockLayout:
        """The layout of an adapter (standard layers need no index).

        Args:
            layer: a layer adapter of :func:`model_layers` / ``Curvature.layers``.

        Returns:
            Its :class:`BlockLayout`.
        """
        params = layer.parameters()
        shapes = tuple(tuple(p.shape) for p in params)
        if layer.standard:
            return cls(layer.name, layer.d_out, layer.d_in, shapes, layer.weight, layer.bias)
        offsets, off = {}, 0
        for p in params:
            offsets[id(p)] = off
            off += p.numel()
        return cls(layer.name, layer.d_out, layer.d_in, shapes,
                   index=layer.layer_index(offsets).to(params[0].device))

    @property
    def size(self) -> int:
        """``d_out · d_in``, the number of block entries."""
        return self.d_out * self.d_in

    def block(self, tensors: Sequence[Tensor]) -> Tensor:
        """``W̃`` of shape ``(d_out, d_in)`` from tensors shaped like the layer's parameters.

        Differentiable (reshapes, a concatenation or a gather), so a penalty on ``W̃`` reaches
        the parameters' gradients.

        Args:
            tensors: one tensor per parameter, shaped as :attr:`shapes`.

        Returns:
            The block ``(d_out, d_in)``.
        """
        if self.index is None:
            cols, i = [], 0
            if self.weight:
                cols.append(tensors[i].reshape(self.d_out, -1))
                i += 1
            if self.bias:
                cols.append(tensors[i].reshape(self.d_out, 1))
            return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return flat[self.index.to(flat.device)].reshape(self.d_out, self.d_in)

    def split(self, M: Tensor) -> list[Tensor]:
        """Inverse of :meth:`block`: tensors shaped like the parameters from ``(d_out, d_in)``.

        Entries of the parameters outside the block (other groups' rows) are zero.

        Args:
            M: a block ``(d_out, d_in)``.

        Returns:
            One tensor per parameter, shaped as :attr:`shapes`.
        """
        if self.index is None:
            out, i = [], 0
            if self.weight:
                w = self.shapes[0]
                out.append(M[:, : self.d_in - (1 if self.bias else 0)].reshape(w))
                i += 1
            if self.bias:
                out.append(M[:, -1].reshape(self.shapes[i]))
            return out
        numels = [int(torch.Size(s).numel()) for s in self.shapes]
        flat = M.new_zeros(sum(numels))
        flat[self.index.to(M.device)] = M.reshape(-1)
        return [t.reshape(s) for t, s in zip(flat.split(numels), self.shapes)]

    def describe(self) -> dict:
        """Plain description ``{"name", "d_out", "d_in", "shapes"}`` (for state dicts)."""
        return {"name": self.name, "d_out": self.d_out, "d_in": self.d_in,
                "shapes": [list(s) for s in self.shapes]}


def model_layers(model: nn.Module, params: Sequence[nn.Parameter]) -> list[LayerAdapter]:
    """The layers (rules, then the generic route) owning ``params``, as ``curvkit.fisher`` finds them.

    In model order, the layer-space order of every structure.

    Args:
        model: the network.
        params: the selected parameters.

    Returns:
        The layer adapters.

    Raises:
        ValueError: a parameter is listed twice or is not a parameter of the model.
        UnsupportedLayerError: a rule refuses its layer's configuration.
    """
    return find_rules(model, list(params))

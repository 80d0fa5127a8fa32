"""The parameters EWC protects, remembered by name, and their layer-space blocks ``W̃_l``.

EWC measures ``Δ_t = θ − θ*_t`` in layer space (``W̃_l = [W_l | b_l]`` for standard layers, see
:mod:`curvkit.curvature.layout`), the space every stored Fisher acts in. The parameters are
remembered by their names in ``model.named_parameters()``, so the penalty always reads the
model's current tensors; a model whose layout changed is refused with a message naming the
layer, never measured against Fishers of another layout.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from curvkit.curvature.layout import BlockLayout, model_layers
from curvkit.curvature.streaming import LayerAdapter

__all__ = ["ParameterLayout"]


def _changed(what: str) -> str:
    return f"EWC: the model changed shape since consolidation: {what}"


class ParameterLayout:
    """Protected parameters by name; after the first consolidation also their layers.

    Args:
        model: the network.
        params: the parameters to protect (default: all with ``requires_grad``).

    Raises:
        ValueError: a parameter is not the model's, is listed twice, or none is left.
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter] | None) -> None:
        self.model = model
        named = list(model.named_parameters())
        if params is None:
            names = [n for n, p in named if p.requires_grad]
        else:
            by_id = {id(p): n for n, p in named}
            names = []
            for i, p in enumerate(params):
                if id(p) not in by_id:
                    raise ValueError(f"EWC: params[{i}] (shape {tuple(p.shape)}) is not a parameter "
                                     f"of the model; pass tensors from model.parameters()")
                names.append(by_id[id(p)])
            if len(set(names)) != len(names):
                raise ValueError("EWC: params lists the same parameter twice")
        if not names:
            raise ValueError("EWC: no parameters to protect (none require grad)")
        self.names: list[str] = names
        self.layers: list[LayerAdapter] | None = None
        self.blocks_layout: list[BlockLayout] = []
        self.layer_names: list[list[str]] = []

    @classmethod
    def from_names(cls, model: nn.Module, names: Sequence[str]) -> ParameterLayout:
        """A layout of saved parameter names (``load_state_dict``).

        Raises:
            ValueError: a name is not a parameter of the model.
        """
        self = cls.__new__(cls)
        self.model, self.names = model, list(names)
        self.layers, self.blocks_layout, self.layer_names = None, [], []
        self.current()
        return self

    # ------------------------------------------------------------------ parameters
    def current(self) -> list[nn.Parameter]:
        """The model's current tensors of the protected names.

        Raises:
            ValueError: a name no longer exists in the model.
        """
        named = dict(self.model.named_parameters())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise ValueError(_changed(
                f"parameters {missing} no longer exist. EWC anchors are tied to the parameter "
                "layout; create a new EWC (or restore the model's structure)."))
        return [named[n] for n in self.names]

    # ------------------------------------------------------------------ layers
    def layout_of(self, layers: Sequence[LayerAdapter]) -> tuple[list[BlockLayout], list[list[str]]]:
        """Block layouts and per-layer parameter names of ``layers`` (adapters of this model)."""
        qual = {id(p): n for n, p in self.model.named_parameters()}
        return ([BlockLayout.of(layer) for layer in layers],
                [[qual[id(p)] for p in layer.parameters()] for layer in layers])

    def describe(self, layouts: Sequence[BlockLayout] | None = None,
                 names: Sequence[Sequence[str]] | None = None) -> list[dict]:
        """Plain description of each layer: block shape, parameter names and shapes."""
        layouts = self.blocks_layout if layouts is None else layouts
        names = self.layer_names if names is None else names
        return [{**b.describe(), "params": list(n)} for b, n in zip(layouts, names)]

    def adopt(self, layers: Sequence[LayerAdapter], where: str) -> None:
        """Fix the layers at the first consolidation; later ones must have the same layout.

        Args:
            layers: the layers of a consolidation's Curvature (``F.layers``).
            where: the calling method, for the message.

        Raises:
            ValueError: the layout differs from the stored one.
        """
        layouts, names = self.layout_of(layers)
        if self.layers is not None:
            old, new = self.describe(), self.describe(layouts, names)
            if old != new:
                raise ValueError(
                    f"EWC.{where}: the model's layer layout changed since the previous "
                    f"consolidation ({_summary(old)} -> {_summary(new)}); create a new EWC for "
                    "the new layout")
            return
        self.layers, self.blocks_layout, self.layer_names = list(layers), layouts, names

    def rebuild(self, described: list[dict]) -> None:
        """Find the layers of the model again (``load_state_dict``) and check them.

        Args:
            described: :meth:`describe` of the saved EWC.

        Raises:
            ValueError: the model's layout is not the described one.
        """
        named = dict(self.model.named_parameters())
        layers = model_layers(self.model, [named[n] for n in self.names])
        layouts, names = self.layout_of(layers)
        new = self.describe(layouts, names)
        if new != described:
            raise ValueError(
                "EWC.load_state_dict: the model changed shape since consolidation (or is another "
                f"model): the state has layers {_summary(described)}, the model "
                f"{_summary(new)}; load it into a model of the saved architecture")
        self.layers, self.blocks_layout, self.layer_names = layers, layouts, names

    def blocks(self) -> list[Tensor]:
        """The current ``W̃_l`` of every layer, attached to the autograd graph.

        Raises:
            RuntimeError: no layout yet (nothing consolidated).
            ValueError: the model changed shape (names the layer).
        """
        if self.layers is None:
            raise RuntimeError("EWC has no layer layout yet; call consolidate() first")
        self.current()  # every name still exists
        named = dict(self.model.named_parameters())
        out = []
        for layout, names in zip(self.blocks_layout, self.layer_names):
            ts = [named[n] for n in names]
            now = [tuple(t.shape) for t in ts]
            if now != list(layout.shapes):
                had = ", ".join(f"{n} {s}" for n, s in zip(names, layout.shapes))
                got = ", ".join(f"{n} {s}" for n, s in zip(names, now))
                raise ValueError(_changed(
                    f"layer '{layout.name or '<model>'}' had {had}, now {got}. Stored anchors "
                    "and Fishers only fit the old layout; create a new EWC (or restore the old "
                    "layer)."))
            out.append(layout.block(ts))
        return out


def _summary(described: list[dict]) -> str:
    return "[" + ", ".join(f"'{d['name']}' {d['d_out']}×{d['d_in']}" for d in described) + "]"

"""The stored quadratic forms of EWC: what is kept of one task's Fisher and how ``Δᵀ F Δ`` is read.

A :class:`Term` is ``coef · Δᵀ F Δ`` measured from anchor number ``anchor``, with ``Δ`` given as
the per-layer blocks ``W̃_l − W̃*_l`` (layer space, see :mod:`curvkit.curvature.layout`). ``F`` is
kept in one of four forms, each made only of plain tensors so that a state dict loads with
``torch.load(weights_only=True)``:

* ``"columns"`` (``"full"`` / ``"block_diag"``, dual route): the per-layer inputs ``ã`` and
  errors ``ẽ`` of the capture, ``F = G Gᵀ`` (Benzing 2022, App. C.2). With the ``Gᵀv`` trick
  (App. E), ``u_l = G_lᵀ Δ_l = (Σ_τ ẽ_{l,mτ}ᵀ Δ_l ã_{l,nτ})_m``; ``"full"``:
  ``Δᵀ F Δ = ‖Σ_l u_l‖²``; ``"block_diag"``: ``Σ_l ‖u_l‖²``. Autograd through ``u`` gives
  ``∇ ½‖u‖² = G u = F Δ``. Cost ``O(M·P)``; nothing ``P × M`` or ``P × P`` is formed.
* ``"operator"`` (``"kfac"``: ``blockdiag_l(B̂_l ⊗ Â_l)``, paper eq 2; ``"foof"``: ``I ⊗ Â_l``,
  eq 6; ``"full"`` / ``"block_diag"`` over many batches on the primal route: the ``P × P``
  matrix or one per layer; any registered structure built from linalg operators): the
  layer-space operator, ``Δᵀ F Δ = Δ · (F Δ)``, saved by :func:`curvkit.linalg.state.operator_state`.
* ``"diagonal"`` (``"diag"``): ``diag F``.

A ``"columns"`` term may be a **shard** (``EWC(distributed="shard")`` under ``torch.distributed``):
rank ``r`` of ``W`` keeps only its own columns ``U_r`` of the union Fisher ``F = Σ_r U_r U_rᵀ``
(errors already scaled by ``1/√N`` of the union ``N``), and :meth:`Term.quadratic` returns the
local ``‖U_rᵀ Δ‖²`` (``"full"``; ``Σ_l ‖U_{r,l}ᵀ Δ_l‖²`` for ``"block_diag"``) with no
collective; ``shard = [r, W]`` records where the columns belong.

An operator that linalg cannot save (a user's own :class:`~curvkit.linalg.LinearOperator`
subclass) has a penalty but no state dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvkit.curvature import Curvature
from curvkit.curvature import distributed as dd
from curvkit.curvature.streaming import LayerAdapter
from curvkit.linalg import (
    BlockDiagonal,
    LinearOperator,
    LowRankFactor,
    OuterProductFactor,
    StackedFactor,
    Woodbury,
)
from curvkit.linalg.state import operator_from_state, operator_state

__all__ = ["Term", "term_of", "FORMS", "STATE_STRUCTURES"]

#: The stored forms of a Fisher (see the module docstring).
FORMS = ("columns", "operator", "diagonal")
#: Built-in structures, each with a plain-tensor state (user structures: if linalg can save them).
STATE_STRUCTURES = ("full", "block_diag", "kfac", "foof", "diag")


@dataclass
class Term:
    """One stored quadratic form ``coef · Δᵀ F Δ`` measured from anchor number ``anchor``.

    Attributes:
        coef: the weight (``γ^{age}`` for online EWC, else 1).
        anchor: index of the anchor ``θ*`` the term is measured from.
        form: one of :data:`FORMS`.
        stacked: ``"columns"``: one block over all layers (``"full"``) rather than one per
            layer (``"block_diag"``).
        tensors: the form's tensors: ``"a"``, ``"e"`` (per layer); ``"diagonal"``.
        num_data: ``N``, the number of data of the Fisher.
        operator: the layer-space operator of an ``"operator"`` term.
        shard: ``[r, W]`` for a ``"columns"`` term holding only rank ``r``'s columns of a
            ``W``-process union (``EWC(distributed="shard")``); ``None``: all columns.
    """

    coef: float
    anchor: int
    form: str
    stacked: bool = False
    tensors: dict[str, Any] = field(default_factory=dict)
    num_data: int = 0
    operator: LinearOperator | None = None
    shard: list[int] | None = None
    _cache: list | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ reading Δᵀ F Δ
    def _factors(self, layers: list[LayerAdapter]) -> list:
        if self._cache is None:
            self._cache = [layer.factor(a, e) for layer, a, e in
                           zip(layers, self.tensors["a"], self.tensors["e"])]
        return self._cache

    def quadratic(self, delta: list[Tensor], layers: list[LayerAdapter]) -> Tensor:
        """``Δᵀ F Δ`` for per-layer blocks ``delta`` (``W̃_l − W̃*_l``), differentiable.

        Args:
            delta: one ``(d_out, d_in)`` block per layer.
            layers: the layers of the parameter layout (layer-space order).

        Returns:
            A scalar tensor.
        """
        if self.form == "columns":
            us = [f.rmatmat(d.reshape(-1, 1)) for f, d in zip(self._factors(layers), delta)]
            if self.stacked:  # ‖Σ_l G_lᵀ Δ_l‖²
                u = us[0]
                for ul in us[1:]:
                    u = u + ul
                return (u * u).sum()
            return torch.stack([(ul * ul).sum() for ul in us]).sum()
        x = torch.cat([d.reshape(-1) for d in delta])
        if self.form == "diagonal":
            return (self.tensors["diagonal"] * x * x).sum()
        assert self.operator is not None
        Fx = self.operator @ x
        assert isinstance(Fx, Tensor)
        return torch.dot(x, Fx)

    # ------------------------------------------------------------------ memory and state
    def nbytes(self) -> int:
        """Bytes of the stored tensors (an ``"operator"`` term: those its object holds)."""
        if self.operator is not None:
            return _tensor_bytes(self.operator)
        return sum(_nbytes(t) for v in self.tensors.values()
                   for t in (v if isinstance(v, list) else [v]) if t is not None)

    def state(self, structure: str) -> dict[str, Any]:
        """Plain state (numbers, strings, ``None``, lists and dicts of tensors) for ``torch.save``.

        Args:
            structure: the EWC's structure (for the message).

        Returns:
            The state of this term.

        Raises:
            TypeError: the term holds an operator that linalg cannot save.
        """
        out = {"coef": self.coef, "anchor": self.anchor, "form": self.form,
               "stacked": self.stacked, "num_data": self.num_data,
               "shard": None if self.shard is None else list(self.shard),
               "tensors": {k: (list(v) if isinstance(v, list) else v)
                           for k, v in self.tensors.items()}}
        if self.operator is not None:
            try:
                out["operator"] = operator_state(self.operator)
            except TypeError as err:
                raise TypeError(
                    f"EWC.state_dict: structure {structure!r} keeps its Fisher as a "
                    f"{type(self.operator).__name__} operator, which has no plain-tensor state "
                    f"({err}); the built-in structures {list(STATE_STRUCTURES)} all have one"
                ) from err
        return out

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Term:
        """Inverse of :meth:`state` (no validation; see ``EWC.load_state_dict``).

        Args:
            d: a term's state.

        Returns:
            The term.
        """
        op, shard = d.get("operator"), d.get("shard")
        return cls(float(d["coef"]), int(d["anchor"]), str(d["form"]), bool(d["stacked"]),
                   {k: (list(v) if isinstance(v, list) else v) for k, v in d["tensors"].items()},
                   int(d["num_data"]), None if op is None else operator_from_state(op),
                   None if shard is None else [int(x) for x in shard])


def _finite(ts, what: str) -> None:
    for t in ts:
        if t is not None and not torch.isfinite(t).all():
            raise FloatingPointError(f"EWC.consolidate: non-finite Fisher {what}")


def _own(t: Tensor) -> Tensor:
    return t.detach().clone(memory_format=torch.contiguous_format)


def term_of(F: Curvature) -> Term:
    """The stored form of a task's Fisher ``F`` (see the module docstring).

    Args:
        F: the Curvature of one consolidation (any structure).

    Returns:
        A :class:`Term` with ``coef = 1`` and ``anchor = 0``; a shard (``shard = [r, W]``, this
        rank's columns only) when ``F``'s Woodbury columns are held by their ranks
        (``curvkit.fisher(..., distributed_columns="shard")``).

    Raises:
        FloatingPointError: the Fisher has non-finite entries (names the layer).
        TypeError: sharded columns that are not per-layer outer-product factors.
    """
    s, N = F.structure, F.num_data
    op = F.operator
    local = _local_columns(op) if s in ("full", "block_diag") and F.captured is None else None
    if s in ("full", "block_diag") and (F.captured is not None or local is not None):
        pairs = (zip(F.captured.a, F.captured.e) if F.captured is not None
                 else ((f.a, f.e) for f in local or []))
        a, e = [], []
        for layer, (ai, ei) in zip(F.layers, pairs):
            _finite((ai, ei), f"factors at layer {layer.describe()}")
            a.append(_own(ai))
            e.append(_own(ei))
        shard = None if local is None else [dd.rank(), dd.world_size()]
        return Term(1.0, 0, "columns", s == "full", {"a": a, "e": e}, N, shard=shard)
    if s == "diag":
        d = _own(op.diagonal())
        _finite((d,), "diagonal (non-finite entries)")
        return Term(1.0, 0, "diagonal", False, {"diagonal": d}, N)
    return Term(1.0, 0, "operator", False, {}, N, operator=op)


def _local_columns(op: LinearOperator) -> list[OuterProductFactor] | None:
    """This rank's per-layer columns ``U_{r,l}`` of a Woodbury whose columns are sharded, or None.

    ``"full"``: ``Woodbury(ShardedFactor(StackedFactor(U_{r,l} …)))``; ``"block_diag"``:
    ``BlockDiagonal(Woodbury(ShardedFactor(U_{r,l})) …)`` (:mod:`curvkit.curvature.data`).
    """
    if isinstance(op, Woodbury) and isinstance(op.factor, dd.ShardedFactor):
        local = op.factor.local
        blocks = list(local.blocks) if isinstance(local, StackedFactor) else [local]
    elif isinstance(op, BlockDiagonal) and all(
            isinstance(b, Woodbury) and isinstance(b.factor, dd.ShardedFactor) for b in op.blocks):
        blocks = [b.factor.local for b in op.blocks]  # type: ignore[attr-defined]
    else:
        return None
    if not all(isinstance(b, OuterProductFactor) for b in blocks):
        raise TypeError("EWC(distributed='shard') needs per-layer OuterProductFactor columns; got "
                        f"{[type(b).__name__ for b in blocks]}; use distributed='gather'")
    return blocks  # type: ignore[return-value]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _tensor_bytes(obj, seen: set[int] | None = None, depth: int = 0) -> int:
    """Bytes of the distinct tensor storages reachable from a linalg object (attributes, lists)."""
    seen = set() if seen is None else seen
    if isinstance(obj, Tensor):
        st = obj.untyped_storage()
        if st.data_ptr() in seen:
            return 0
        seen.add(st.data_ptr())
        return int(st.nbytes())
    if depth > 8 or id(obj) in seen:
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen, depth + 1) for x in obj.values())
    if isinstance(obj, (LinearOperator, LowRankFactor)):
        seen.add(id(obj))
        return sum(_tensor_bytes(x, seen, depth + 1) for x in vars(obj).values())
    return 0

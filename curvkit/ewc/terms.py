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
* ``"dense"`` (``"full"`` / ``"block_diag"`` over many batches on the primal route): the
  ``P × P`` matrix, or one per layer.
* ``"kronecker"`` (``"kfac"``, ``"foof"``): per layer ``Â`` and ``B̂`` (``None`` for FOOF's
  identity), ``F_l = B̂_l ⊗ Â_l`` (paper eq 2, eq 6).
* ``"diagonal"`` (``"diag"``): ``diag F``.

Registered structures outside these are kept as their operator (:attr:`Term.operator`); such a
term has a penalty but no state dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvkit.curvature import Curvature
from curvkit.curvature.kfac import KFACFactors, KroneckerBlockDiagonal, factors_of
from curvkit.curvature.streaming import LayerAdapter
from curvkit.linalg import BlockDiagonal, Dense, LinearOperator, LowRankFactor

__all__ = ["Term", "term_of", "FORMS", "STATE_STRUCTURES"]

#: The stored forms of a Fisher (see the module docstring).
FORMS = ("columns", "dense", "kronecker", "diagonal")
#: Structures whose Fisher has a plain-tensor form (and so a state dict).
STATE_STRUCTURES = ("full", "block_diag", "kfac", "foof", "diag")


@dataclass
class Term:
    """One stored quadratic form ``coef · Δᵀ F Δ`` measured from anchor number ``anchor``.

    Attributes:
        coef: the weight (``γ^{age}`` for online EWC, else 1).
        anchor: index of the anchor ``θ*`` the term is measured from.
        form: one of :data:`FORMS`, or ``"operator"`` for another registered structure.
        stacked: ``"columns"`` / ``"dense"``: one block over all layers (``"full"``) rather
            than one per layer (``"block_diag"``).
        tensors: the form's tensors: ``"a"``, ``"e"`` (per layer); ``"dense"`` (per block);
            ``"A"``, ``"B"`` (per layer, ``B`` entries ``None`` for FOOF); ``"diagonal"``.
        num_data: ``N``, the number of data of the Fisher.
        operator: the layer-space operator of an ``"operator"`` term.
    """

    coef: float
    anchor: int
    form: str
    stacked: bool = False
    tensors: dict[str, Any] = field(default_factory=dict)
    num_data: int = 0
    operator: LinearOperator | None = None
    _cache: LinearOperator | list | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ reading Δᵀ F Δ
    def _factors(self, layers: list[LayerAdapter]) -> list:
        if self._cache is None:
            self._cache = [layer.factor(a, e) for layer, a, e in
                           zip(layers, self.tensors["a"], self.tensors["e"])]
        return self._cache  # type: ignore[return-value]

    def _operator(self, layers: list[LayerAdapter]) -> LinearOperator:
        if self.operator is not None:
            return self.operator
        if self._cache is None:
            if self.form == "dense":
                blocks: list[LinearOperator] = [Dense(m) for m in self.tensors["dense"]]
                self._cache = blocks[0] if self.stacked else BlockDiagonal(blocks)
            else:
                factors = KFACFactors(tuple(layers), tuple(self.tensors["A"]),
                                      tuple(self.tensors["B"]), self.num_data, None)
                self._cache = KroneckerBlockDiagonal(factors, name="EWC[kronecker]")
        return self._cache  # type: ignore[return-value]

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
        Fx = self._operator(layers) @ x
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
        """Plain state (numbers, strings, lists of tensors) for ``torch.save``.

        Raises:
            TypeError: the term holds an operator of a structure without a plain-tensor form.
        """
        if self.operator is not None:
            raise TypeError(
                f"EWC.state_dict: structure {structure!r} keeps its Fisher as a "
                f"{type(self.operator).__name__} object, which has no plain-tensor state; "
                f"state dicts are supported for structures {list(STATE_STRUCTURES)}")
        return {"coef": self.coef, "anchor": self.anchor, "form": self.form,
                "stacked": self.stacked, "num_data": self.num_data,
                "tensors": {k: (list(v) if isinstance(v, list) else v)
                            for k, v in self.tensors.items()}}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Term:
        """Inverse of :meth:`state` (no validation; see ``EWC.load_state_dict``)."""
        return cls(float(d["coef"]), int(d["anchor"]), str(d["form"]), bool(d["stacked"]),
                   {k: (list(v) if isinstance(v, list) else v) for k, v in d["tensors"].items()},
                   int(d["num_data"]))


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
        A :class:`Term` with ``coef = 1`` and ``anchor = 0``.

    Raises:
        FloatingPointError: the Fisher has non-finite entries (names the layer).
    """
    s, N = F.structure, F.num_data
    if s in ("full", "block_diag") and F.captured is not None:
        a, e = [], []
        for layer, ai, ei in zip(F.layers, F.captured.a, F.captured.e):
            _finite((ai, ei), f"factors at layer {layer.describe()}")
            a.append(_own(ai))
            e.append(_own(ei))
        return Term(1.0, 0, "columns", s == "full", {"a": a, "e": e}, N)
    op = F.operator
    if s == "full" and isinstance(op, Dense):
        return Term(1.0, 0, "dense", True, {"dense": [_own(op.to_dense())]}, N)
    if s == "block_diag" and isinstance(op, BlockDiagonal) and all(
            isinstance(b, Dense) for b in op.blocks):
        return Term(1.0, 0, "dense", False, {"dense": [_own(b.to_dense()) for b in op.blocks]}, N)
    if s in ("kfac", "foof") and isinstance(op, KroneckerBlockDiagonal):
        fac = factors_of(F)
        _finite((*fac.A, *fac.B), "factors")
        return Term(1.0, 0, "kronecker", False,
                    {"A": [_own(A) for A in fac.A],
                     "B": [None if B is None else _own(B) for B in fac.B]}, N)
    if s == "diag":
        d = _own(op.diagonal())
        _finite((d,), "diagonal (non-finite entries)")
        return Term(1.0, 0, "diagonal", False, {"diagonal": d}, N)
    return Term(1.0, 0, "operator", False, {}, N, operator=op)


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

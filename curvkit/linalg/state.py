"""Plain-tensor state of the structured operators, for ``torch.save`` / ``torch.load(weights_only=True)``.

:func:`operator_state` turns an operator built from :class:`~curvkit.linalg.Woodbury` (layer,
dense, stacked or scaled factors), :class:`~curvkit.linalg.Kronecker`,
:class:`~curvkit.linalg.Diagonal`, :class:`~curvkit.linalg.Dense`,
:class:`~curvkit.linalg.BlockDiagonal` and scalar multiples into nested dicts of tensors, strings
and numbers; :func:`operator_from_state` rebuilds the same operator (same numbers).
"""

from __future__ import annotations

from curvkit.linalg.blockdiag import BlockDiagonal
from curvkit.linalg.compose import _Scaled
from curvkit.linalg.dense import Dense
from curvkit.linalg.diagonal import Diagonal
from curvkit.linalg.kronecker import Kronecker
from curvkit.linalg.lowrank import DenseFactor, LowRankFactor, ScaledFactor, StackedFactor
from curvkit.linalg.onehot import OneHotFactor
from curvkit.linalg.operator import LinearOperator
from curvkit.linalg.outer import OuterProductFactor
from curvkit.linalg.woodbury import Woodbury

__all__ = ["operator_state", "operator_from_state"]


def _factor_state(f: LowRankFactor) -> dict:
    if isinstance(f, OuterProductFactor):
        return {"type": "outer", "a": f.a, "e": f.e, "gram_route": f.gram_route}
    if isinstance(f, OneHotFactor):
        return {"type": "onehot", "idx": f.idx, "e": f.e, "num_rows": f.V}
    if isinstance(f, DenseFactor):
        return {"type": "dense", "U": f.U}
    if isinstance(f, StackedFactor):
        return {"type": "stacked", "blocks": [_factor_state(b) for b in f.blocks]}
    if isinstance(f, ScaledFactor):
        return {"type": "scaled", "scale": f.scale, "factor": _factor_state(f.factor)}
    raise TypeError(f"cannot save a {type(f).__name__} factor; supported: OuterProductFactor, "
                    "OneHotFactor, DenseFactor, StackedFactor, ScaledFactor")


def _factor_from(s: dict) -> LowRankFactor:
    t = s["type"]
    if t == "outer":
        return OuterProductFactor(s["a"], s["e"], s["gram_route"])
    if t == "onehot":
        return OneHotFactor(s["idx"], s["e"], s["num_rows"])
    if t == "dense":
        return DenseFactor(s["U"])
    if t == "stacked":
        return StackedFactor([_factor_from(b) for b in s["blocks"]])
    return ScaledFactor(_factor_from(s["factor"]), s["scale"])


def operator_state(op: LinearOperator) -> dict:
    """Nested dict of tensors/str/numbers describing ``op`` (see module doc).

    Args:
        op: the operator.

    Returns:
        The state.

    Raises:
        TypeError: an operator or factor type that cannot be saved (named).
    """
    base = {"name": op.name}
    if isinstance(op, Woodbury):
        return {**base, "type": "woodbury", "route": op.route, "factor": _factor_state(op.factor)}
    if isinstance(op, Kronecker):
        return {**base, "type": "kronecker", "A": op.A, "B": op.B, "d_out": op.d_out}
    if isinstance(op, Diagonal):
        return {**base, "type": "diagonal", "d": op.d}
    if isinstance(op, Dense):
        return {**base, "type": "dense", "A": op.A}
    if isinstance(op, BlockDiagonal):
        return {**base, "type": "blockdiag", "blocks": [operator_state(b) for b in op.blocks]}
    if isinstance(op, _Scaled):
        return {**base, "type": "scaled", "c": op.c, "op": operator_state(op.a)}
    raise TypeError(f"cannot save a {type(op).__name__} operator; supported: Woodbury, Kronecker, "
                    "Diagonal, Dense, BlockDiagonal and scalar multiples")


def operator_from_state(s: dict) -> LinearOperator:
    """Rebuild the operator saved by :func:`operator_state`.

    Args:
        s: the state.

    Returns:
        The operator.
    """
    t, name = s["type"], s["name"]
    if t == "woodbury":
        return Woodbury(_factor_from(s["factor"]), route=s["route"], name=name)
    if t == "kronecker":
        return Kronecker(s["B"], s["A"], d_out=s["d_out"], name=name)
    if t == "diagonal":
        return Diagonal(s["d"], name=name)
    if t == "dense":
        return Dense(s["A"], name=name)
    if t == "blockdiag":
        return BlockDiagonal([operator_from_state(b) for b in s["blocks"]], name=name)
    return s["c"] * operator_from_state(s["op"])

"""The vector formats every operator accepts: ``(P,)``, ``(P, k)`` or a list of tensors.

:class:`VectorFormats` is the part of :class:`~curvkit.linalg.LinearOperator` that converts a
vector to the ``(P, k)`` matrix the operator's contract works on and back, and checks it (shape,
dtype, device, finiteness of a right-hand side), with messages that name the problem.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvkit.linalg.finite import all_finite

__all__ = ["Vector", "VectorFormats"]

Vector = Tensor | list[Tensor] | tuple[Tensor, ...]


class VectorFormats:
    """Mixin: needs ``shape``, ``block_shapes``, ``name``, ``dtype`` and ``device``."""

    shape: tuple[int, int]
    block_shapes: list[torch.Size] | None
    name: str
    dtype: torch.dtype
    device: torch.device

    def _to_matrix(self, v: Vector, what: str = "v") -> tuple[Tensor, str]:
        """Convert ``v`` to a ``(P, k)`` tensor; return it with a tag describing the format."""
        P = self.shape[0]
        if isinstance(v, (list, tuple)):
            self._check_list(v, what)
            return torch.cat([t.reshape(-1) for t in v]).unsqueeze(1), "list"
        if not isinstance(v, Tensor):
            raise TypeError(f"{what} must be a Tensor or a list of Tensors, got {type(v).__name__}")
        self._check_tensor(v, what)
        if v.dim() == 1 and v.shape[0] == P:
            return v.unsqueeze(1), "vector"
        if v.dim() == 2 and v.shape[0] == P:
            return v, "matrix"
        raise ValueError(
            f"{what} has shape {tuple(v.shape)}; {self.name} of shape {self.shape} accepts ({P},), "
            f"({P}, k) or a list of tensors shaped like its parameters"
        )

    def _check_list(self, v: list[Tensor] | tuple[Tensor, ...], what: str) -> None:
        """Check a list-format vector: one tensor per block, right shapes, dtype and device."""
        if self.block_shapes is None:
            raise TypeError(f"{self.name} has no block shapes; pass a flat tensor of shape "
                            f"({self.shape[0]},)")
        if len(v) != len(self.block_shapes):
            raise ValueError(
                f"{what} has {len(v)} tensors but {self.name} expects {len(self.block_shapes)} "
                f"shaped {[tuple(s) for s in self.block_shapes]}"
            )
        for i, (t, s) in enumerate(zip(v, self.block_shapes)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{what}[{i}] is {type(t).__name__}, expected a torch.Tensor")
            if t.shape != s:
                raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)}, expected {tuple(s)}")
            self._check_tensor(t, f"{what}[{i}]")

    def _check_rhs(self, X: Tensor) -> None:
        """Refuse a right-hand side with NaN or Inf entries (a solve of it is undefined)."""
        if not all_finite(X):
            raise ValueError(f"the right-hand side of {self.name}.solve has NaN or Inf entries; "
                             "check the gradients or vectors passed (a solve of them is undefined)")

    def _check_tensor(self, t: Tensor, what: str) -> None:
        if t.dtype != self.dtype:
            raise TypeError(f"{what} has dtype {t.dtype} but {self.name} works in {self.dtype}")
        if t.device.type != self.device.type or (
            self.device.index is not None and t.device.index not in (None, self.device.index)
        ):
            raise ValueError(f"{what} is on {t.device} but {self.name} lives on {self.device}")

    def _from_matrix(self, X: Tensor, fmt: str) -> Vector:
        if fmt == "vector":
            return X.squeeze(1)
        if fmt == "matrix":
            return X
        assert self.block_shapes is not None
        out, i = [], 0
        for s in self.block_shapes:
            n = math.prod(s)
            out.append(X[i : i + n, 0].reshape(s))
            i += n
        return out

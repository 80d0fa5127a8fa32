"""The inner and outer objectives of the implicit hypergradient: closures or losses over data.

An :class:`Objective` is ``L_T`` or ``L_V`` of Benzing (2022), App. C.3, given either as a closure
``() -> L`` (it reads the data it closes over) or as a per-batch loss ``loss(inputs, targets) ->
L_k`` (the batch *mean*) with data: one batch or an iterable of batches (tensors, ``(inputs,
targets)`` tuples, dicts; parsed as :func:`curvkit.fisher` parses them). Over batches ``B_k`` of
``N_k`` data (``N = Σ_k N_k``) the objective is that of the union::

    L = (1/N) Σ_k N_k L_k,        ∇L = (1/N) Σ_k N_k ∇L_k

which equals the closure on the concatenated batch. Each pass calls ``loss`` once per batch.
With an initialised ``torch.distributed`` group and data, each rank passes its shard and the
sums over batches are all-reduced: the objective is that of the union of every rank's data
(closures are taken as they are, per rank).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from curvkit.curvature.data import iter_batches
from curvkit.curvature.distributed import all_reduce_sum, is_distributed

__all__ = ["Objective", "weighted_mean", "union_mean", "check_tensors"]


def check_tensors(tensors: Any, what: str) -> list[Tensor]:
    """``tensors`` as a list of distinct floating tensors requiring grad.

    Raises:
        TypeError: a single tensor, a non-tensor or a non-floating dtype.
        ValueError: empty, not requiring grad, or a tensor listed twice.
    """
    if isinstance(tensors, Tensor):
        raise TypeError(f"{what} must be a sequence of tensors, got a single Tensor; wrap it: [{what}]")
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{what} is empty")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, expected a torch.Tensor")
        if not t.is_floating_point():
            raise TypeError(f"{what}[{i}] has dtype {t.dtype}; it must be floating point")
        if not t.requires_grad:
            raise ValueError(f"{what}[{i}] (shape {tuple(t.shape)}) does not require grad; call "
                             ".requires_grad_() on it")
    if len({id(t) for t in tensors}) != len(tensors):
        raise ValueError(f"{what} lists the same tensor twice")
    return tensors


def weighted_mean(parts: list[Tensor], weights: list[float], total: float) -> Tensor:
    """``(1/W) Σ_k w_k x_k`` with ``W = total``; one part of full weight is returned unchanged."""
    if len(parts) == 1 and weights[0] == total:
        return parts[0]
    out = parts[0] * (weights[0] / total)
    for x, w in zip(parts[1:], weights[1:]):
        out = out + x * (w / total)
    return out


def union_mean(parts: list[list[Tensor]], weights: list[list[float]], total: float,
               like: list[Tensor], distributed: bool) -> list[Tensor | None]:
    """Per tensor ``(1/W) Σ_k w_k x_k`` (``None`` where no term has one), ``W = total``.

    With ``distributed`` the sums, the weights and which tensors were reached are all-reduced over
    the ``torch.distributed`` ranks first (every rank must call it), so the mean is that of the
    union of every rank's data.
    """
    if not distributed:
        return [weighted_mean(p, ws, total) if p else None for p, ws in zip(parts, weights)]
    sums = [torch.zeros_like(t).detach() for t in like]
    for s, p, ws in zip(sums, parts, weights):
        for x, w in zip(p, ws):
            s.add_(x.detach(), alpha=w)
    reached = torch.tensor([1.0 if p else 0.0 for p in parts], dtype=torch.float64,
                           device=like[0].device)
    W = torch.tensor([float(total)], dtype=torch.float64, device=like[0].device)
    all_reduce_sum([*sums, reached, W])
    return [s / float(W) if r > 0 else None for s, r in zip(sums, reached)]


class Objective:
    """A scalar objective as a closure or as per-batch mean losses over data (module docstring).

    Args:
        fn: ``() -> L`` (``data is None``) or ``(inputs, targets) -> L_k``.
        data: ``None``, one batch or an iterable of batches.
        what: ``"inner_loss"`` or ``"outer_loss"`` (for messages).
        progress: tqdm bar over an iterable of batches (default on).

    Raises:
        TypeError: ``fn`` is not callable.
    """

    def __init__(self, fn: Callable[..., Tensor], data: Any, what: str,
                 progress: bool | None = None) -> None:
        if not callable(fn):
            args = "no arguments" if data is None else "arguments (inputs, targets)"
            raise TypeError(f"{what} must be a callable with {args} returning a scalar tensor, "
                            f"got {type(fn).__name__}")
        self.fn, self.data, self.what, self.progress = fn, data, what, progress
        #: per-batch losses over each rank's shard of the data: sums are all-reduced
        self.distributed = data is not None and is_distributed()

    def _scalar(self, out: Any, call: str) -> Tensor:
        if not isinstance(out, Tensor) or out.numel() != 1:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{call} must return a scalar tensor, got {got}")
        if not torch.isfinite(out):
            raise FloatingPointError(f"{call} returned a non-finite value ({float(out.detach())})")
        return out.reshape(())

    def losses(self) -> Iterator[tuple[float, Tensor]]:
        """``(w_k, L_k)``: ``(1, L)`` for a closure, ``(N_k, L_k)`` per batch over data.

        Raises:
            ValueError: a loss that is not a scalar, or data without any batch.
            FloatingPointError: a non-finite loss.
        """
        if self.data is None:
            yield 1.0, self._scalar(self.fn(), f"{self.what}()")
            return
        empty = True
        for b in iter_batches(self.data, None, progress=self.progress,
                              desc=f"curvkit.hypergrad[{self.what}]"):
            empty = False
            yield float(b.size), self._scalar(self.fn(b.inputs, b.targets),
                                              f"{self.what}(inputs, targets)")
        if empty:
            raise ValueError(f"the data of {self.what} yielded no batch; pass at least one")

    def gradients(self, tensors: list[Tensor], create_graph: bool
                  ) -> Iterator[tuple[float, tuple[Tensor | None, ...]]]:
        """``(w_k, ∇ L_k)`` w.r.t. ``tensors`` per term (``None`` where a tensor is unused)."""
        for w, L in self.losses():
            yield w, torch.autograd.grad(L, tensors, create_graph=create_graph, allow_unused=True)

    def mean_gradient(self, tensors: list[Tensor]) -> list[Tensor | None]:
        """``∇L = (1/N) Σ_k N_k ∇L_k`` (no graph kept; ``None`` where unused in every batch)."""
        parts: list[list[Tensor]] = [[] for _ in tensors]
        weights: list[list[float]] = [[] for _ in tensors]
        total = 0.0
        for w, grads in self.gradients(tensors, create_graph=False):
            total += w
            for i, g in enumerate(grads):
                if g is not None:
                    parts[i].append(g)
                    weights[i].append(w)
        return union_mean(parts, weights, total, tensors, self.distributed)

"""``torch.distributed`` helpers: every rank holds a shard of the data, curvature is of the union.

Only collective operations on tensors are used (``all_reduce`` with ``SUM``, ``all_gather``), so
any backend works (gloo on CPU, nccl on GPUs). Rank ``r``'s data come after those of ranks
``0 … r−1`` in the union, so gathered results equal one process on the rank-ordered concatenation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import override

from curvkit.linalg import LowRankFactor, OuterProductFactor, StackedFactor

__all__ = ["is_distributed", "world_size", "rank", "all_reduce_sum", "all_gather_rows",
           "all_gather_counts", "ShardedFactor"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes of the default ``torch.distributed`` group (1 if not initialised)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default ``torch.distributed`` group (0 if not initialised)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Sum every tensor over the ranks (in place, one flattened collective); returns them."""
    if not is_distributed() or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, off = [], 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[off:off + n].reshape(t.shape).to(t.dtype))
        out.append(t)
        off += n
    return out


def all_gather_counts(n: int, device: torch.device) -> list[int]:
    """The integer ``n`` of every rank, in rank order."""
    if not is_distributed():
        return [int(n)]
    mine = torch.tensor([int(n)], dtype=torch.int64, device=device)
    got = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(got, mine)
    return [int(g) for g in got]


def all_gather_rows(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order (rows may differ per rank)."""
    if not is_distributed():
        return x
    counts = all_gather_counts(x.shape[0], x.device)
    top = max(counts)
    pad = x.new_zeros((top, *x.shape[1:]))
    pad[: x.shape[0]] = x
    got = [torch.empty_like(pad) for _ in counts]
    dist.all_gather(got, pad.contiguous())
    return torch.cat([g[:c] for g, c in zip(got, counts)])


class ShardedFactor(LowRankFactor):
    """``U = [U_0 | U_1 | …]`` across ranks; rank ``r`` holds only its own columns ``U_r``.

    Products are collective (every rank calls them with the same right-hand sides):

    * ``Uᵀ X`` -- local ``U_rᵀ X`` (``M_r × k``), all-gathered to ``M × k``;
    * ``U W`` -- local ``U_r W_r`` on this rank's rows of ``W``, one all-reduce of ``P × k``;
    * ``K = Uᵀ U`` -- row block ``U_rᵀ [U_0 | …]`` from the per-layer inputs and errors that each
      rank broadcasts in turn (one other rank's columns held at a time), then all-gathered; the
      ``M × M`` Gram is replicated (the Woodbury core needs it whole).

    Memory per rank: its own columns (``1/world`` of them) plus one other rank's during the Gram.

    Args:
        local: this rank's columns, a :class:`~curvkit.linalg.StackedFactor` (or a single
            block) of :class:`~curvkit.linalg.OuterProductFactor` sharing the layer layout on
            every rank.
    """

    def __init__(self, local: LowRankFactor) -> None:
        self.local = local
        self.size, self.dtype, self.device = local.size, local.dtype, local.device
        self.counts = all_gather_counts(local.rank, local.device)
        self.rank = sum(self.counts)
        self.offset = sum(self.counts[: rank()])

    @override
    def rmatmat(self, X: Tensor) -> Tensor:
        return all_gather_rows(self.local.rmatmat(X))

    @override
    def matmat(self, W: Tensor) -> Tensor:
        out = self.local.matmat(W[self.offset:self.offset + self.local.rank].contiguous())
        return all_reduce_sum([out.contiguous()])[0]

    def _blocks(self) -> list[OuterProductFactor]:
        blocks = self.local.blocks if isinstance(self.local, StackedFactor) else [self.local]
        if not all(isinstance(b, OuterProductFactor) for b in blocks):
            raise TypeError("ShardedFactor needs per-layer OuterProductFactor blocks")
        return [b for b in blocks if isinstance(b, OuterProductFactor)]

    def _from_rank(self, src: int) -> LowRankFactor:
        """Rank ``src``'s columns on every rank (broadcast of its per-layer ``a`` and ``e``)."""
        out: list[LowRankFactor] = []
        for b in self._blocks():
            n = self.counts[src] // b.R
            a = b.a if rank() == src else b.a.new_empty((n, *b.a.shape[1:]))
            e = b.e if rank() == src else b.e.new_empty((n * b.R, *b.e.shape[1:]))
            a, e = a.contiguous(), e.contiguous()
            dist.broadcast(a, src=src)
            dist.broadcast(e, src=src)
            out.append(OuterProductFactor(a, e, b.gram_route))
        return StackedFactor(out) if isinstance(self.local, StackedFactor) else out[0]

    @override
    def gram(self) -> Tensor:
        return self.gram64().to(self.dtype)

    @override
    def sq_row_norms(self) -> Tensor:
        return all_reduce_sum([self.local.sq_row_norms().contiguous()])[0]

    # float64-accumulated products of the Woodbury solve (see LowRankFactor)
    @override
    def gram64(self) -> Tensor:
        row = torch.cat([self.local.cross_gram64(self._from_rank(s))
                         for s in range(len(self.counts))], dim=1)
        return all_gather_rows(row)

    @override
    def rmatmat64(self, X: Tensor) -> Tensor:
        return all_gather_rows(self.local.rmatmat64(X))

    @override
    def sub_matmat64(self, X: Tensor, W: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
        W = W.to(torch.float64)
        Wr = W[self.offset:self.offset + self.local.rank].contiguous()
        zero = torch.zeros(X.shape, dtype=torch.float64, device=X.device)
        UW = self.local.sub_matmat64(zero, Wr, -1.0)  # U_r W_r in float64
        UW = all_reduce_sum([UW])[0]  # one all-reduce of the P × k product
        Y = (X.to(torch.float64) - UW) * scale
        return Y.to(X.dtype) if out is None else out.copy_(Y)

    @override
    def columns(self, start: int, stop: int) -> Tensor:
        raise NotImplementedError(
            "the Woodbury columns are held by their ranks (ShardedFactor); use the dual route "
            "(route='dual') or route='primal', which all-reduces the P×P matrix")

"""``torch.distributed`` helpers: every rank holds a shard of the data, curvature is of the union.

Only collective operations on tensors are used (``all_reduce`` with ``SUM``, ``all_gather``), so
any backend works (gloo on CPU, nccl on GPUs). Rank ``r``'s data come after those of ranks
``0 … r−1`` in the union, so gathered results equal one process on the rank-ordered concatenation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "world_size", "rank", "all_reduce_sum", "all_gather_rows",
           "all_gather_counts"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
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

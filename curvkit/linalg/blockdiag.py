"""Block-diagonal composition ``A = blockdiag(A_1, …, A_L)`` of operators."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor
from typing_extensions import override

from curvkit.linalg.operator import Damping, LinearOperator


class BlockDiagonal(LinearOperator):
    """``blockdiag(A_1, …, A_L)``; every method acts block by block.

    ``solve(v, D) = blockdiag((A_l + D_l)⁻¹) v``, ``logdet(D) = Σ_l log det(A_l + D_l)``; samples,
    ``diag((A + D)⁻¹)`` and eigenvalues are concatenated; a per-parameter damping is cut at the
    block boundaries (exact wherever each block accepts its piece). The accepted damping modes are
    those every block accepts.

    Args:
        blocks: the operators ``A_l``.
        block_shapes, name: see :class:`~curvkit.linalg.LinearOperator`.

    Raises:
        ValueError: no blocks.
    """

    def __init__(self, blocks: Sequence[LinearOperator], block_shapes=None, name: str | None = None):
        if not blocks:
            raise ValueError("BlockDiagonal needs at least one block")
        self.blocks: Sequence[LinearOperator] = blocks
        self.sizes = [b.shape[0] for b in blocks]
        super().__init__(sum(self.sizes), blocks[0].dtype, blocks[0].device, block_shapes, name)
        modes = set(blocks[0].damping_modes)
        for b in blocks[1:]:
            modes &= set(b.damping_modes)
        self.damping_modes = tuple(m for m in blocks[0].damping_modes if m in modes)

    def _split(self, damping: Damping) -> list[Damping]:
        if isinstance(damping, Tensor):
            return list(damping.split(self.sizes))
        return [damping] * len(self.blocks)

    def _matmat(self, X: Tensor) -> Tensor:
        return torch.cat([b._matmat(x) for b, x in zip(self.blocks, X.split(self.sizes))])

    def _prepare(self, damping: float, damping_mode: str) -> None:
        for b in self.blocks:
            b._prepare(damping, damping_mode)

    def _solve(self, X: Tensor, damping: Damping, damping_mode: str) -> Tensor:
        return torch.cat([b._solve(x, d, damping_mode)
                          for b, x, d in zip(self.blocks, X.split(self.sizes), self._split(damping))])

    def _logdet(self, damping: Damping) -> Tensor:
        # Python's sum of a non-empty generator of tensors is a tensor (blocks are never empty)
        return cast(Tensor, sum(b._logdet(d) for b, d in zip(self.blocks, self._split(damping))))

    def _is_singular(self) -> bool:
        return any(b._is_singular() for b in self.blocks)

    def _rank_bound(self) -> int:
        return sum(b._rank_bound() for b in self.blocks)

    # ------------------------------------------------------------------ Gaussian methods
    def _sample(self, k: int, damping: Damping, generator: torch.Generator | None) -> Tensor:
        return torch.cat([b._sample(k, d, generator) for b, d in zip(self.blocks, self._split(damping))])

    def _inverse_diagonal(self, damping: Damping) -> Tensor:
        return torch.cat([b._inverse_diagonal(d) for b, d in zip(self.blocks, self._split(damping))])

    def _row_pieces(self, J) -> list:
        """``J`` cut into the blocks' rows: groups of its row blocks where they align, else dense."""
        from curvkit.linalg.lowrank import DenseFactor, StackedFactor

        rows = J.row_blocks()
        pieces, i = [], 0
        for size in self.sizes:
            group, total = [], 0
            while total < size and i < len(rows):
                group.append(rows[i])
                total += rows[i].size
                i += 1
            if total != size:
                U = J.dense(torch.float64)
                return [DenseFactor(u) for u in U.split(self.sizes)]
            pieces.append(group[0] if len(group) == 1 else StackedFactor(group))
        return pieces

    def _inverse_quad_blocks(self, J, R: int, damping: Damping) -> Tensor:
        out: Tensor | None = None
        for b, Jb, d in zip(self.blocks, self._row_pieces(J), self._split(damping)):
            q = b._inverse_quad_blocks(Jb, R, d)
            out = q if out is None else out + q
        if out is None:
            raise ValueError(f"{self.name} has no blocks")
        return out

    def _eigenvalues(self) -> Tensor:
        return torch.cat([b.eigenvalues() for b in self.blocks])

    def _logdet_function(self, group_sizes: list[int] | None) -> Callable[[Tensor], Tensor]:
        if group_sizes is None:
            return super()._logdet_function(None)
        bounds = [0]
        for g in group_sizes:
            bounds.append(bounds[-1] + g)
        parts, off = [], 0
        for b in self.blocks:
            lo, hi = off, off + b.shape[0]
            inside = [g for g in range(len(group_sizes)) if bounds[g] < hi and bounds[g + 1] > lo]
            if len(inside) == 1:
                parts.append((b._logdet_function(None), inside))
            elif bounds[inside[0]] == lo and bounds[inside[-1] + 1] == hi:
                parts.append((b._logdet_function(group_sizes[inside[0]:inside[-1] + 1]), inside))
            else:
                raise NotImplementedError(
                    f"{self.name}: a damping group cuts block {b.name} partially; give every "
                    "block one damping or align the groups with the blocks")
            off = hi

        def fn(t: Tensor) -> Tensor:
            return cast(Tensor, sum(f(t[g[0]] if len(g) == 1 else t[g[0]:g[-1] + 1]) for f, g in parts))

        return fn

    @override
    def diagonal(self) -> Tensor:
        return torch.cat([b.diagonal() for b in self.blocks])

    @override
    def to_dense(self) -> Tensor:
        self._check_dense_memory()
        return torch.block_diag(*[b.to_dense() for b in self.blocks])

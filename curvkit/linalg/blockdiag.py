"""Block-diagonal composition ``A = blockdiag(A_1, …, A_L)`` of operators."""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.linalg.operator import LinearOperator


class BlockDiagonal(LinearOperator):
    """``blockdiag(A_1, …, A_L)``; products, solves and log-determinants act block by block.

    ``solve(v, λ)`` is ``blockdiag((A_l + λI)⁻¹) v``; ``logdet(λ) = Σ_l log det(A_l + λI)``.
    The accepted damping modes are those every block accepts.
    """

    def __init__(self, blocks: list[LinearOperator], block_shapes=None, name: str | None = None):
        if not blocks:
            raise ValueError("BlockDiagonal needs at least one block")
        self.blocks = blocks
        self.sizes = [b.shape[0] for b in blocks]
        super().__init__(sum(self.sizes), blocks[0].dtype, blocks[0].device, block_shapes, name)
        modes = set(blocks[0].damping_modes)
        for b in blocks[1:]:
            modes &= set(b.damping_modes)
        self.damping_modes = tuple(m for m in blocks[0].damping_modes if m in modes)

    def _matmat(self, X: Tensor) -> Tensor:
        return torch.cat([b._matmat(x) for b, x in zip(self.blocks, X.split(self.sizes))])

    def _prepare(self, damping: float, damping_mode: str) -> None:
        for b in self.blocks:
            b._prepare(damping, damping_mode)

    def _solve(self, X: Tensor, damping: float, damping_mode: str) -> Tensor:
        return torch.cat([b._solve(x, damping, damping_mode)
                          for b, x in zip(self.blocks, X.split(self.sizes))])

    def _logdet(self, damping: float) -> Tensor:
        return sum(b._logdet(damping) for b in self.blocks)

    def _is_singular(self) -> bool:
        return any(b._is_singular() for b in self.blocks)

    def _rank_bound(self) -> int:
        return sum(b._rank_bound() for b in self.blocks)

    def diagonal(self) -> Tensor:
        return torch.cat([b.diagonal() for b in self.blocks])

    def to_dense(self) -> Tensor:
        return torch.block_diag(*[b.to_dense() for b in self.blocks])

"""The posterior-covariance engine: ``Λ = blockdiag_b(Λ_b)`` over the layer-space vector.

:class:`Engine` composes the blocks of :mod:`curvkit.laplace.blocks` (one per Kronecker layer,
one low-rank block for the full structure, ...), maps them to layers, and provides sampling,
solves, ``diag(Λ⁻¹)``, functional covariances and the evidence log-determinant as a function of
``log δ``. :func:`build_lowrank_engine` (``"full"``, ``"block_diag"``) and
:func:`build_operator_engine` (any structure's layer-space operator) build it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvkit.laplace.blocks import (
    Block,
    DenseBlock,
    DiagonalBlock,
    KroneckerBlock,
    LowRankBlock,
)
from curvkit.linalg import (
    BlockDiagonal,
    Diagonal,
    Kronecker,
    LinearOperator,
    LowRankFactor,
    OuterProductFactor,
    Woodbury,
    check_memory,
)
from curvkit.linalg.factor_ops import CHUNK_BYTES, GemmOuterFactor, ScaledFactor, dense_columns

__all__ = ["Engine", "build_lowrank_engine", "build_operator_engine", "chunk_inputs"]


# ====================================================================== the engine
class Engine:
    """``Λ = blockdiag_b(Λ_b)`` over the layer-space vector.

    Args:
        blocks: the blocks, in layer-space order.
        layer_sizes: sizes ``P_l`` of the layers (to map blocks to layers).
        test_mode: ``"factor"`` (a single :class:`LowRankBlock` over all layers: functional
            variances from Gram matrices) or ``"dense"`` (explicit test Jacobian columns).
    """

    def __init__(self, blocks: Sequence[Block], layer_sizes: Sequence[int], structure: str) -> None:
        self.blocks = list(blocks)
        self.layer_sizes = list(layer_sizes)
        self.structure = structure
        self.size = sum(b.size for b in self.blocks)
        if self.size != sum(self.layer_sizes):
            raise ValueError(f"blocks cover {self.size} parameters but the layers hold "
                             f"{sum(self.layer_sizes)}")
        bounds = [0]
        for s in self.layer_sizes:
            bounds.append(bounds[-1] + s)
        self.bounds = bounds
        self.block_layers: list[list[int]] = []
        self.offsets: list[int] = []
        off = 0
        for b in self.blocks:
            lo, hi = off, off + b.size
            first = max(i for i in range(len(self.layer_sizes)) if bounds[i] <= lo)
            layers = [i for i in range(first, len(self.layer_sizes)) if bounds[i] < hi]
            self.block_layers.append(layers)
            self.offsets.append(off)
            off = hi
        self.dtype = self.blocks[0].dtype

    # ------------------------------------------------------------------ Gaussian
    def sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``(P, n)`` layer-space draws from ``N(0, Λ⁻¹)``."""
        if len(self.blocks) == 1:
            return self.blocks[0].sample(n, generator)
        item = torch.finfo(self.dtype).bits // 8
        check_memory(n * self.size * item, f"{n} samples of {self.size} parameters",
                     self.blocks[0].delta.device)
        return torch.cat([b.sample(n, generator) for b in self.blocks], dim=0)

    def logdet(self) -> Tensor:
        return sum(b.logdet() for b in self.blocks)

    def inverse_diagonal(self) -> Tensor:
        return torch.cat([b.inverse_diagonal() for b in self.blocks])

    def solve(self, X: Tensor) -> Tensor:
        parts, off = [], 0
        for b in self.blocks:
            parts.append(b.solve(X[off:off + b.size]))
            off += b.size
        return torch.cat(parts)

    def functional_blocks(self, Jt: Sequence[OuterProductFactor], R: int) -> Tensor:
        """``J_tᵀ Λ⁻¹ J_t`` blocks (``(N_t, R, R)``, float64) for per-layer test factors ``J_t``."""
        if len(self.blocks) == 1 and isinstance(self.blocks[0], LowRankBlock):
            return self.blocks[0].quad_blocks_factor(Jt, R)
        out = None
        cache: dict[int, Tensor] = {}
        for b, layers, off in zip(self.blocks, self.block_layers, self.offsets):
            if isinstance(b, LowRankBlock) and off == self.bounds[layers[0]] \
                    and b.size == self.bounds[layers[-1] + 1] - off:
                q = b.quad_blocks_factor([Jt[i] for i in layers], R)
            else:
                X = torch.cat([cache.setdefault(i, dense_columns(Jt[i], torch.float64))
                               for i in layers])
                start = off - self.bounds[layers[0]]
                q = b.quad_blocks(X[start:start + b.size], R)
            out = q if out is None else out + q
        return out

    # ------------------------------------------------------------------ evidence pieces
    def logdet_function(self, per_layer: bool) -> Callable[[Tensor], Tensor]:
        """``t ↦ log det Λ(δ = e^t)`` (differentiable) for a scalar ``t`` or one ``t_l`` per layer.

        From eigenvalues where a block has them (one eigendecomposition serves every ``δ``),
        otherwise through a Cholesky factorisation per call (full structure, per-layer ``δ``).
        """
        parts: list[Callable[[Tensor], Tensor]] = []
        for b, layers in zip(self.blocks, self.block_layers):
            single = len(layers) == 1
            if not per_layer or single:
                ev = b.eigenvalues()
                if ev is not None:
                    idx = layers[0]

                    def part(t, ev=ev, size=b.size, idx=idx):
                        tt = t[idx] if per_layer else t
                        return size * tt + torch.log1p(ev * torch.exp(-tt)).sum()

                    parts.append(part)
                    continue
            fn = b.logdet_per_layer([self.layer_sizes[i] for i in layers]) if per_layer else None
            if fn is None:
                raise NotImplementedError(
                    f"structure={self.structure!r}: the evidence for this prior form needs a "
                    "factorisation per call that this block does not offer; use a scalar prior")
            parts.append(lambda t, fn=fn, layers=layers: fn(t[layers]))
        return lambda t: sum(p(t) for p in parts)


# ====================================================================== building
def build_lowrank_engine(J: Sequence[LowRankFactor], delta: Tensor, layer_sizes: Sequence[int],
                         structure: str, route: str = "auto", previous: Engine | None = None) -> Engine:
    """``"full"`` (one block over all layers) or ``"block_diag"`` (one block per layer).

    ``previous``: an engine on the same factors; its cores are rescaled instead of recomputed
    when a block's ``δ`` changes from one constant to another.
    """
    old = list(previous.blocks) if previous is not None else []
    if structure == "full":
        prev = old[0] if len(old) == 1 and isinstance(old[0], LowRankBlock) else None
        return Engine([LowRankBlock(J, delta, route, prev)], layer_sizes, structure)
    blocks, off = [], 0
    for i, f in enumerate(J):
        prev = old[i] if i < len(old) and isinstance(old[i], LowRankBlock) \
            and old[i].J[0] is f else None
        blocks.append(LowRankBlock([f], delta[off:off + f.size], route, prev))
        off += f.size
    return Engine(blocks, layer_sizes, structure)


def _split_diagonal(d: Tensor, delta: Tensor, offset: int, bounds: list[int], num_data: int,
                    dtype: torch.dtype) -> list[Block]:
    """A diagonal block cut at layer boundaries (any cut is exact for a diagonal)."""
    out, lo, hi = [], offset, offset + d.shape[0]
    cuts = sorted({lo, hi, *[x for x in bounds if lo < x < hi]})
    for a, b in zip(cuts[:-1], cuts[1:]):
        out.append(DiagonalBlock(d[a - lo:b - lo], delta[a:b], num_data, dtype))
    return out


def build_operator_engine(operator: LinearOperator, delta: Tensor, layer_sizes: Sequence[int],
                          layer_names: Sequence[str], num_data: int, structure: str,
                          route: str = "auto") -> Engine:
    """An engine from a structure's layer-space operator (KFAC, FOOF, diag, or others).

    ``BlockDiagonal`` operators are split into their blocks; ``Kronecker`` blocks use the
    eigenbasis, ``Diagonal`` blocks are elementwise, ``Woodbury`` blocks use the perturbation
    sampler, anything else is formed explicitly (small blocks only).
    """
    bounds = [0]
    for s in layer_sizes:
        bounds.append(bounds[-1] + s)
    if isinstance(operator, BlockDiagonal):
        ops = list(operator.blocks)
    else:
        ops = [operator]
    blocks: list[Block] = []
    off = 0
    for op in ops:
        size = op.shape[0]
        d = delta[off:off + size]
        layer = max(i for i in range(len(layer_sizes)) if bounds[i] <= off)
        name = f"'{layer_names[layer]}'" if layer < len(layer_names) else f"#{layer}"
        if isinstance(op, Kronecker):
            blocks.append(KroneckerBlock(op, d, num_data, name))
        elif isinstance(op, Diagonal):
            blocks.extend(_split_diagonal(op.diagonal(), delta, off, bounds, num_data, op.dtype))
        elif isinstance(op, Woodbury):
            f = op.factor
            J = (GemmOuterFactor(f.a, f.e * math.sqrt(num_data), f.gram_route)
                 if isinstance(f, OuterProductFactor) else ScaledFactor(f, math.sqrt(num_data)))
            blocks.append(LowRankBlock([J], d, route))
        else:
            blocks.append(DenseBlock(op, d, num_data, name))
        off += size
    if off != delta.shape[0]:
        raise ValueError(f"the {structure!r} operator covers {off} parameters, expected {delta.shape[0]}")
    return Engine(blocks, layer_sizes, structure)


def chunk_inputs(n_inputs: int, per_input_bytes: int) -> int:
    """How many test inputs to process at once so intermediates stay below :data:`CHUNK_BYTES`."""
    return max(1, min(n_inputs, CHUNK_BYTES // max(1, per_input_bytes)))

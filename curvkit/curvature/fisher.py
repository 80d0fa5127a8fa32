"""Exact subsampled Fisher structures in Woodbury form: ``"full"`` and ``"block_diag"``.

``F = G Gᵀ`` with ``G`` given per layer by the captured ``(a, e)`` (Benzing 2022, App. I, eqs 19–23):

* ``"full"``: one Woodbury operator on the stacked layer factors; the ``M × M`` Gram is
  ``K = Σ_l (A_lᵀA_l) ⊙ (E_lᵀE_l)`` (location Gram or per-sample route for convolutions).
* ``"block_diag"``: ``blockdiag_l(G_l G_lᵀ)``, one Woodbury operator per layer (a layer's
  weight and bias together).

Option ``reduce_rank=True`` (exact softmax Fisher only): the ``C`` columns per input span at most
``C − 1`` directions, so they are replaced by ``C − 1`` columns with the same ``G Gᵀ``
(:func:`reduce_softmax_errors`); ``M = N·(C − 1)``, and every ``M × M`` core is smaller.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.curvature.build import BuildContext, register_structure
from curvkit.linalg import (
    BlockDiagonal,
    LinearOperator,
    LowRankFactor,
    OuterProductFactor,
    StackedFactor,
    Woodbury,
)


def softmax_null_basis(p: Tensor) -> Tensor:
    """Orthonormal bases ``Q_n ∈ R^{C×(C−1)}`` of ``√p_n^⊥``, one per row of ``p`` (Householder).

    The exact softmax Fisher factor ``S_n`` (rows ``s_c = √p_c (p − 1_c)``) satisfies
    ``Σ_c √p_c s_c = 0``, so ``G_n G_nᵀ = (G_n Q_n)(G_n Q_n)ᵀ`` with ``Q_n Q_nᵀ = I − u uᵀ``,
    ``u = √p/‖√p‖``. ``H = I − 2 v vᵀ/‖v‖²`` with ``v = u + 1_C`` maps ``u`` to ``−1_C``; its first
    ``C − 1`` columns are orthonormal and orthogonal to ``u`` (``‖v‖² ≥ 2``: no cancellation).

    Args:
        p: ``(N, C)`` class probabilities.

    Returns:
        ``(N, C, C − 1)`` with ``Q_nᵀ Q_n = I`` and ``Q_nᵀ √p_n = 0``.

    Raises:
        ValueError: ``p`` is not ``(N, C)`` with ``C ≥ 2``.
    """
    if p.dim() != 2 or p.shape[1] < 2:
        raise ValueError(f"p must be (N, C) with C ≥ 2, got shape {tuple(p.shape)}")
    u = p.clamp_min(0).sqrt()
    u = u / u.norm(dim=1, keepdim=True)
    v = u.clone()
    v[:, -1] += 1.0
    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    H = eye - 2.0 * v[:, :, None] * v[:, None, :] / (v * v).sum(1)[:, None, None]
    return H[:, :, :-1]


def reduce_softmax_errors(e: Tensor, p: Tensor) -> Tensor:
    """Rank ``C − 1`` per input: ``ẽ_{n k} = Σ_c Q_n[c, k] e_{n c}`` (same ``G Gᵀ``, fewer columns).

    Args:
        e: ``(N·C, T, d_out)`` errors of the exact softmax Fisher, input-major (``m = n·C + c``).
        p: ``(N, C)`` class probabilities at the same parameters.

    Returns:
        ``(N·(C−1), T, d_out)``, input-major.

    Raises:
        ValueError: ``e`` does not have ``N·C`` rows.
    """
    N, C = p.shape
    if e.shape[0] != N * C:
        raise ValueError(f"e has {e.shape[0]} rows, expected N·C = {N * C}")
    Q = softmax_null_basis(p.to(e.dtype))
    out = torch.einsum("nck,ncto->nkto", Q, e.reshape(N, C, *e.shape[1:]))
    return out.reshape(N * (C - 1), *e.shape[1:])


def captured_factors(cap, layers, gram_route: str = "auto", reduce_rank: bool | str = False
                     ) -> list[LowRankFactor]:
    """One factor per layer (given by the layer's rule) from captured inputs and errors.

    Args:
        cap: the :class:`~curvkit.capture.Captured` batch.
        layers: its layer adapters (each rule turns its ``(a, e)`` into a factor).
        gram_route: see :class:`~curvkit.linalg.OuterProductFactor` (``"auto"``: the rule's own).
        reduce_rank: ``C − 1`` columns per input (exact softmax Fisher; module doc); ``"auto"``:
            exactly when that applies (classification, exact kind, ``(N, C)`` outputs, ``C ≥ 2``).

    Returns:
        The per-layer factors of ``G``.

    Raises:
        ValueError: ``reduce_rank`` without ``likelihood='classification'``, ``kind='exact'`` and
            ``(N, C)`` outputs.
    """
    applicable = (cap.likelihood == "classification" and cap.kind == "exact"
                  and cap.outputs.dim() == 2 and cap.outputs.shape[1] >= 2)
    if reduce_rank == "auto":
        reduce_rank = applicable
    if reduce_rank and not applicable:
        raise ValueError("reduce_rank=True needs likelihood='classification', kind='exact' and "
                         f"(N, C) outputs with C ≥ 2 (got {cap.likelihood!r}, {cap.kind!r}, outputs of shape "
                         f"{tuple(cap.outputs.shape)})")
    p = torch.softmax(cap.outputs.to(torch.float64), dim=1) if reduce_rank else None
    out: list[LowRankFactor] = []
    for layer, a, e in zip(layers, cap.a, cap.e):
        if p is not None:  # reduce_rank
            e = reduce_softmax_errors(e.to(torch.float64), p).to(e.dtype)
        f = layer.factor(a, e)
        if isinstance(f, OuterProductFactor) and gram_route != "auto":
            f = OuterProductFactor(a, e, gram_route=gram_route)
        out.append(f)
    return out


def layer_factors(ctx: BuildContext, gram_route: str = "auto", reduce_rank: bool | str = False
                  ) -> list[LowRankFactor]:
    """One factor per layer from the context's capture (see :func:`captured_factors`)."""
    return captured_factors(ctx.captured, ctx.layers, gram_route, reduce_rank)


def lowrank_operator(cap, layers, structure: str, route: str = "auto", gram_route: str = "auto",
                     reduce_rank: bool | str = False) -> LinearOperator:
    """The ``"full"`` (one Woodbury) or ``"block_diag"`` (one per layer) layer-space operator.

    Args:
        cap: the captured batch.
        layers: its layers (for names).
        structure: ``"full"`` or ``"block_diag"``.
        route: the Woodbury route, see :class:`~curvkit.linalg.Woodbury`.
        gram_route: how each layer's Gram is formed, see :class:`~curvkit.linalg.OuterProductFactor`.
        reduce_rank: see :func:`captured_factors`.

    Returns:
        The operator ``G Gᵀ`` (or its block diagonal).
    """
    factors = captured_factors(cap, layers, gram_route, reduce_rank)
    if structure == "full":
        return Woodbury(StackedFactor(factors), route=route, name="Fisher[full]")
    return BlockDiagonal([Woodbury(f, route=route, name=f"Fisher[block {l.name}]")
                          for f, l in zip(factors, layers)], name="Fisher[block_diag]")


def _check_options(structure: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = set(options) - set(allowed)
    if unknown:
        raise TypeError(f"structure={structure!r} got unknown options {sorted(unknown)}; "
                        f"allowed: {list(allowed)}")


@register_structure("full")
def build_full(ctx: BuildContext, route: str = "auto", gram_route: str = "auto",
               reduce_rank: bool | str = False, **options) -> LinearOperator:
    """Full subsampled Fisher ``G Gᵀ`` (Woodbury; ``route``: auto/cost/dual/primal)."""
    _check_options("full", options, ())
    return lowrank_operator(ctx.captured, ctx.layers, "full", route, gram_route, reduce_rank)


@register_structure("block_diag")
def build_block_diag(ctx: BuildContext, route: str = "auto", gram_route: str = "auto",
                     reduce_rank: bool | str = False, **options) -> LinearOperator:
    """Block-diagonal subsampled Fisher ``blockdiag_l(G_l G_lᵀ)`` (per-layer Woodbury)."""
    _check_options("block_diag", options, ())
    return lowrank_operator(ctx.captured, ctx.layers, "block_diag", route, gram_route, reduce_rank)

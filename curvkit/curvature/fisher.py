"""Exact subsampled Fisher structures in Woodbury form: ``"full"`` and ``"block_diag"``.

``F = G Gᵀ`` with ``G`` given per layer by the captured ``(a, e)`` (math_spec §2-4):

* ``"full"``: one Woodbury operator on the stacked layer factors; the ``M × M`` Gram is
  ``K = Σ_l (A_lᵀA_l) ⊙ (E_lᵀE_l)`` (location Gram or per-sample route for convolutions).
* ``"block_diag"``: ``blockdiag_l(G_l G_lᵀ)``, one Woodbury operator per layer (a layer's
  weight and bias together).
"""

from __future__ import annotations

from curvkit.curvature.build import BuildContext, register_structure
from curvkit.linalg import BlockDiagonal, LowRankFactor, OuterProductFactor, StackedFactor, Woodbury


def layer_factors(ctx: BuildContext, gram_route: str = "auto") -> list[LowRankFactor]:
    """One factor per layer from the captured inputs and errors (given by the layer's rule)."""
    cap = ctx.captured
    out = []
    for layer, a, e in zip(ctx.layers, cap.a, cap.e):
        f = layer.factor(a, e)
        if isinstance(f, OuterProductFactor) and gram_route != "auto":
            f = OuterProductFactor(a, e, gram_route=gram_route)
        out.append(f)
    return out


def _check_options(structure: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = set(options) - set(allowed)
    if unknown:
        raise TypeError(f"structure={structure!r} got unknown options {sorted(unknown)}; "
                        f"allowed: {list(allowed)}")


@register_structure("full")
def build_full(ctx: BuildContext, route: str = "auto", gram_route: str = "auto",
               **options) -> Woodbury:
    """Full subsampled Fisher ``G Gᵀ`` (Woodbury; ``route``: auto/dual/primal)."""
    _check_options("full", options, ())
    return Woodbury(StackedFactor(layer_factors(ctx, gram_route)), route=route,
                    name="Fisher[full]")


@register_structure("block_diag")
def build_block_diag(ctx: BuildContext, route: str = "auto", gram_route: str = "auto",
                     **options) -> BlockDiagonal:
    """Block-diagonal subsampled Fisher ``blockdiag_l(G_l G_lᵀ)`` (per-layer Woodbury)."""
    _check_options("block_diag", options, ())
    blocks = [Woodbury(f, route=route, name=f"Fisher[block {l.name}]")
              for f, l in zip(layer_factors(ctx, gram_route), ctx.layers)]
    return BlockDiagonal(blocks, name="Fisher[block_diag]")

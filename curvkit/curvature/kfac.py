"""Kronecker-factored structures: ``"kfac"`` (``B̂ ⊗ Â`` per layer) and ``"foof"`` (``I ⊗ Â``).

Index letters (as in :mod:`curvkit.linalg.outer`), declared once:

* ``n`` -- input (datapoint), ``N`` of them;
* ``r`` -- repeat per input: ``R = C`` (kind ``"exact"``), ``S = mc_samples`` (``"mc"``) or 1
  (``"empirical"``); ``m = n·R + r`` is a column of ``G``, ``M = N·R`` of them;
* ``t`` -- location: ``T = 1`` for a Linear layer on ``(N, d)`` inputs, ``T = H_out·W_out`` for
  a Conv2d (unfolded patches), the product of the middle dimensions for a Linear layer on
  ``(N, *, d)`` inputs;
* ``d`` -- input feature (``d_in``, including the ones column of a selected bias);
* ``o`` -- output unit (``d_out``).

The capture stores ``a_{nt} ∈ R^{d_in}`` and the errors ``ẽ_{mt} ∈ R^{d_out}`` with the Fisher
scaling already folded in (``√p_c/√N`` for exact, ``1/√(N·S)`` for mc, ``1/√N`` for empirical),
so that ``F = Σ_m g_m g_mᵀ`` with ``g_m = vec_r(Σ_t ẽ_{mt} a_{nt}ᵀ)`` (paper App. E).

**KFAC factors** (Martens & Grosse 2015; for ``T > 1`` the KFC convention of Grosse & Martens
2016, ``Ω = E[Σ_t a aᵀ]``, ``Γ = E[(1/T) Σ_t ê êᵀ]``)::

    Â = (1/N) Σ_n Σ_t a_{nt} a_{ntᵀ}          (d_in × d_in;  sum over locations)
    B̂ = (1/T) Σ_m Σ_t ẽ_{mt} ẽ_{mtᵀ}          (d_out × d_out; mean over locations)
    F_l ≈ B̂ ⊗ Â                               (row-major vec_r(W̃_l), W̃_l = [W_l | b_l])

For ``T = 1`` this is ``Â = (1/N) Σ_n ã_n ã_nᵀ`` and ``B̂ = Σ_m ẽ_m ẽ_mᵀ = (1/N) Σ_n
E_y[e_n e_nᵀ]``, the expectation taken as the Fisher kind says (exact: ``Σ_c p_c``; mc: mean
over the ``S`` sampled labels; empirical: the data label). KFAC is exact (equals the
block-diagonal Fisher) for one datapoint on a single Linear layer, and for deep linear
networks with the Gaussian likelihood and kind ``"exact"``.

The split of ``T`` between the factors does not change ``B̂ ⊗ Â`` nor the π-damped matrix (the
π rule rescales ``λ_A``, ``λ_B`` with the factors), so the product equals curvlinops'
"KFAC-expand" (which puts ``1/T`` into ``Â``). The paper's public code uses a batch *sum* for a
Linear layer's ``Â`` and no ``1/T`` in a convolution's ``B̂``: its damping values differ from
curvkit's by those factors (the paper says so itself, App. D.4).

**Damping** (paper eqs 2–4 and footnote 2), applied per layer by
:class:`~curvkit.linalg.Kronecker`:

* ``damping_mode="exact"`` (standard): ``(B̂ ⊗ Â + λI)⁻¹`` through eigendecompositions;
* ``damping_mode="heuristic"`` (factored Tikhonov): ``((B̂ + λ_B I) ⊗ (Â + λ_A I))⁻¹``, i.e.
  ``V ↦ (B̂ + λ_B I)⁻¹ V (Â + λ_A I)⁻¹`` with ``λ_A = π√λ``, ``λ_B = √λ/π`` and
  ``π = sqrt((tr Â/d_in)/(tr B̂/d_out))``, guarded to ``π = 1`` when not finite or zero.

Both factorise in float64, also for float32 networks.

**FOOF** (paper §4, eq 6): ``F_l ≈ I ⊗ Â`` with the same ``Â``; ``solve(v, λ)`` is
``V ↦ V (Â + λI)⁻¹`` per layer. It needs one forward pass only (no loss, no labels), so the Fisher
``kind`` passed to :func:`~curvkit.fisher` is ignored for ``structure="foof"``.

The per-layer factors are exposed as :class:`KFACFactors` on the layer-space operator:
``F = curvkit.fisher(..., structure="kfac"); F.operator.factors`` (or :func:`factors_of`),
and the damped matrices of both modes by :meth:`KroneckerBlockDiagonal.damped_dense`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvkit.capture import LayerAdapter, UnsupportedLayerError, capture_inputs
from curvkit.curvature.base import Curvature
from curvkit.curvature.build import BuildContext, register_structure
from curvkit.linalg import BlockDiagonal, Kronecker
from curvkit.linalg.memory import check_memory

__all__ = [
    "KFACFactors", "KroneckerBlockDiagonal", "input_factor", "output_factor", "location_gram",
    "factors_of", "CONVENTION",
]

#: One-line statement of the factor normalisation (shown in reprs and reports).
CONVENTION = ("Â = (1/N) Σ_n Σ_t ã ãᵀ, B̂ = (1/T) Σ_m Σ_t ẽ ẽᵀ (errors carry the Fisher scaling); "
              "layer block B̂ ⊗ Â on row-major vec([W | b])")


#: From this factor size on, :func:`location_gram` forms the Gram from three half-size blocks.
HALVES_FROM = 128


def _gram_by_halves(block: Callable[[slice, slice], Tensor], d: int, like: Tensor) -> Tensor:
    """``G`` from ``block(I, J) = G[I, J]``: the two diagonal blocks and one off-diagonal block.

    ``G`` is symmetric, so ``G[a, b] = G[b, a]ᵀ`` saves a quarter of the multiply-adds.
    """
    if d < HALVES_FROM:
        return block(slice(None), slice(None))
    a, b = slice(0, d // 2), slice(d // 2, d)
    G = like.new_empty(d, d)
    G[a, a] = block(a, a)
    G[b, a] = block(b, a)
    G[b, b] = block(b, b)
    G[a, b] = G[b, a].T
    return G


def location_gram(x: Tensor, scale: float = 1.0, symmetrize: bool = True) -> Tensor:
    """``scale · Σ_m Σ_t x_{mt} x_{mt}ᵀ`` for ``x`` of shape ``(M, T, d)``.

    A dense layer's factor is one GEMM with the scale folded in. Unfolded convolution patches
    arrive as a transposed view of a contiguous ``(M, d, T)`` tensor: when ``d ≤ T`` the sum is
    taken as batched products on that view, which avoids copying the ``M·T·d`` patches;
    otherwise the patches are copied once into ``(d, M·T)`` (whole rows of ``T``, not an
    elementwise transpose) for plain GEMMs; for ``d ≥`` :data:`HALVES_FROM` from three
    half-size blocks, the fourth by symmetry. ``symmetrize=False`` skips the ``(G + Gᵀ)/2`` pass
    (callers whose factorisations read one triangle, e.g. the optimizers).
    """
    M, T, d = x.shape
    xt = x.transpose(1, 2)
    if T > 1 and xt.is_contiguous():  # unfolded convolution patches
        if d <= T:
            def block(i: slice, j: slice) -> Tensor:
                return torch.bmm(xt[:, i], x[:, :, j]).sum(0)
        else:
            rows = xt.transpose(0, 1).reshape(d, M * T)

            def block(i: slice, j: slice) -> Tensor:
                return torch.mm(rows[i], rows[j].T)
        G = _gram_by_halves(block, d, x)
        if scale != 1.0:
            G.mul_(scale)
    else:
        flat = x.reshape(-1, d)
        G = torch.mm(flat.T, flat) if scale == 1.0 else torch.addmm(
            flat.new_zeros(()), flat.T, flat, beta=0.0, alpha=scale)
    return 0.5 * (G + G.T) if symmetrize else G


def input_factor(a: Tensor, num_data: int | None = None, *, symmetrize: bool = True) -> Tensor:
    """KFAC's input factor ``Â = (1/N) Σ_n Σ_t a_{nt} a_{nt}ᵀ`` (paper eq 2 / App. E).

    From captured inputs ``a`` of shape ``(N, T, d_in)``; also FOOF's ``AAᵀ`` (eq 6) as a batch
    mean. Serves ``curvkit.fisher``, the optimizers, EWC and validate.

    Args:
        a: layer inputs (unfolded patches for a convolution, with a ones column for a bias).
        num_data: ``N`` (default ``a.shape[0]``).
        symmetrize: see :func:`location_gram`.

    Returns:
        The symmetric ``(d_in, d_in)`` factor in ``a``'s dtype.
    """
    if a.dim() != 3:
        raise ValueError(f"a must be 3-D (N, T, d_in), got shape {tuple(a.shape)}")
    N = a.shape[0] if num_data is None else int(num_data)
    return location_gram(a, 1.0 / N, symmetrize)


def input_factor_of(layer: LayerAdapter, a: Tensor, num_data: int | None = None) -> Tensor:
    """:func:`input_factor` of a layer's captured ``a``, also for one-hot (embedding) inputs.

    For a rule whose ``a`` holds one-hot indices ``(N, T, 1)`` (``layer.one_hot``, −1 for no row)
    ``Â = (1/N) Σ_{n,t} 1_{i_{nt}} 1_{i_{nt}}ᵀ = (1/N) diag(counts)`` (``V × V``, memory checked),
    without forming the one-hots; otherwise :func:`input_factor`.

    Args:
        layer: the layer adapter.
        a: its captured inputs.
        num_data: ``N`` (default ``a.shape[0]``).

    Returns:
        The symmetric ``(d_in, d_in)`` factor.
    """
    if not getattr(layer, "one_hot", False):
        return input_factor(a, num_data)
    N = a.shape[0] if num_data is None else int(num_data)
    V = layer.d_in
    dtype = layer.parameters()[0].dtype
    check_memory(V * V * torch.finfo(dtype).bits // 8, f"KFAC's {V}×{V} input factor of layer "
                 f"{layer.describe()} (diagonal index counts)", a.device)
    idx = a.reshape(-1)
    counts = torch.bincount(idx[idx >= 0], minlength=V).to(dtype)
    return torch.diag(counts / N)


def output_factor(e: Tensor, *, symmetrize: bool = True) -> Tensor:
    """KFAC's output factor ``B̂ = (1/T) Σ_m Σ_t ẽ_{mt} ẽ_{mt}ᵀ`` (paper eq 2 / App. E).

    From captured errors ``e`` of shape ``(M, T, d_out)``; the ``1/T`` is KFC's for convolutions.

    The Fisher scaling (``1/√N``, ``√p``, ``1/√S``) is already in ``e``, so no further division by
    ``N`` is needed: for ``T = 1`` this is ``(1/N) Σ_n E_y[e_n e_nᵀ]``.

    Args:
        e: layer errors.
        symmetrize: see :func:`location_gram`.

    Returns:
        The symmetric ``(d_out, d_out)`` factor in ``e``'s dtype.
    """
    if e.dim() != 3:
        raise ValueError(f"e must be 3-D (M, T, d_out), got shape {tuple(e.shape)}")
    return location_gram(e, 1.0 / e.shape[1], symmetrize)


@dataclass(frozen=True)
class KFACFactors:
    """Per-layer Kronecker factors of one batch (see the module docstring for the formulas).

    Attributes:
        layers: the layers, in model order (same order as the layer-space blocks).
        A: per layer ``Â`` of shape ``(d_in, d_in)`` (with the bias row/column last).
        B: per layer ``B̂`` of shape ``(d_out, d_out)``, or ``None`` for FOOF (identity).
        num_data: ``N``.
        kind: the Fisher kind of ``B̂`` (``None`` for FOOF).
    """

    layers: tuple[LayerAdapter, ...]
    A: tuple[Tensor, ...]
    B: tuple[Tensor | None, ...]
    num_data: int
    kind: str | None

    def __len__(self) -> int:
        return len(self.layers)

    def by_name(self) -> dict[str, tuple[Tensor | None, Tensor]]:
        """``{layer name: (B̂, Â)}``."""
        return {layer.name: (B, A) for layer, A, B in zip(self.layers, self.A, self.B)}


class KroneckerBlockDiagonal(BlockDiagonal):
    """``blockdiag_l(B̂_l ⊗ Â_l)`` in layer space, holding its :class:`KFACFactors`.

    Supports ``damping_mode="exact"`` and ``"heuristic"`` (see the module docstring).

    Args:
        factors: the per-layer factors (``B = None`` entries are identities, FOOF).
        name: the structure's name, used in error messages.
    """

    def __init__(self, factors: KFACFactors, name: str) -> None:
        blocks = [
            Kronecker(B, A, d_out=layer.d_out, name=f"{name}[{layer.name or '<model>'}]")
            for layer, A, B in zip(factors.layers, factors.A, factors.B)
        ]
        super().__init__(blocks, name=name)
        self.kronecker_blocks = blocks  # the same objects as ``blocks``, typed as Kronecker
        self.factors = factors

    def damping_splits(self, damping: float) -> list[tuple[float, float]]:
        """Per layer ``(λ_A, λ_B)`` of the heuristic (π) damping for total damping ``λ``."""
        return [blk.damping_split(damping) for blk in self.kronecker_blocks]

    def damped_dense(self, damping: float, damping_mode: str = "exact") -> Tensor:
        """The damped matrix in layer space (paper eqs 3–4).

        ``"exact"``: ``blockdiag_l(B̂_l ⊗ Â_l + λI)``; ``"heuristic"``:
        ``blockdiag_l((B̂_l + λ_B I) ⊗ (Â_l + λ_A I))``. Dense ``P × P``: small models only.
        """
        if damping_mode not in self.damping_modes:
            raise ValueError(f"damping_mode={damping_mode!r} is not available for {self.name}; it "
                             f"supports {list(self.damping_modes)}")
        lam = self._scalar_damping(self._check_damping(damping), "damped_dense", "pass a number λ")
        return torch.block_diag(*[blk.damped_dense(lam, damping_mode) for blk in self.kronecker_blocks])


def factors_of(F: Curvature) -> KFACFactors:
    """The :class:`KFACFactors` of a Curvature built with ``structure="kfac"`` or ``"foof"``."""
    op = getattr(F, "operator", None)
    if not isinstance(op, KroneckerBlockDiagonal):
        raise TypeError(
            f"{getattr(F, 'name', type(F).__name__)} has no Kronecker factors; build it with "
            "curvkit.fisher(..., structure='kfac') or structure='foof'"
        )
    return op.factors


def _check_no_options(structure: str, options: dict) -> None:
    if options:
        raise TypeError(f"structure={structure!r} takes no options, got {sorted(options)}")


def _forward_inputs(ctx: BuildContext) -> list[Tensor]:
    """Layer inputs ``a`` from one forward pass (FOOF needs nothing else; guarded if ``check``)."""
    return capture_inputs(ctx.model, ctx.inputs, ctx.layers, check=ctx.check,
                          output_fn=ctx.output_fn)


def _without_kronecker(ctx: BuildContext) -> list:
    return [layer for layer in ctx.layers if not layer.kronecker]


@register_structure("kfac")
def build_kfac(ctx: BuildContext, **options) -> KroneckerBlockDiagonal:
    """KFAC: ``blockdiag_l(B̂_l ⊗ Â_l)`` with ``Â``, ``B̂`` as in the module docstring.

    One forward pass and the backward seeds of the chosen Fisher kind (``C`` for exact, ``S`` for
    mc, one for empirical); only the ``d × d`` factors are kept.

    A layer without a Kronecker form (norm layers' affine parameters, the generic route) gives
    its per-sample gradients explicitly (``a = 1``): its block is then ``B̂ ⊗ [1]`` with
    ``B̂ = G_l G_lᵀ``, the *exact* Fisher block (dense ``P_l × P_l``; refused with a GB estimate
    when it does not fit).
    """
    _check_no_options("kfac", options)
    for layer in _without_kronecker(ctx):
        check_memory(2 * layer.size**2 * 8, f"the exact KFAC block of layer {layer.describe()} "
                     f"({layer.size} parameters without a Kronecker form)", ctx.params[0].device)
    cap = ctx.captured
    N = cap.num_data
    factors = KFACFactors(
        layers=tuple(ctx.layers),
        A=tuple(input_factor_of(layer, a, N) for layer, a in zip(ctx.layers, cap.a)),
        B=tuple(output_factor(e) for e in cap.e),
        num_data=N,
        kind=ctx.kind,
    )
    return KroneckerBlockDiagonal(factors, name="Fisher[kfac]")


@register_structure("foof", uses_loss=False)
def build_foof(ctx: BuildContext, **options) -> KroneckerBlockDiagonal:
    """FOOF: ``blockdiag_l(I ⊗ Â_l)`` from one forward pass (the Fisher ``kind`` is ignored).

    Raises:
        UnsupportedLayerError: a selected parameter has no Kronecker form (FOOF's ``Â`` needs
            layer inputs); the message lists those layers.
    """
    _check_no_options("foof", options)
    bad = _without_kronecker(ctx)
    if bad:
        names = ", ".join(layer.describe() for layer in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise UnsupportedLayerError(
            f"structure='foof' needs a Kronecker form (layer inputs) for every layer; these have "
            f"none: {names}{more}. Use structure='kfac' (exact blocks for them), 'full', "
            "'block_diag' or 'diag', or freeze their parameters (params=[...])."
        )
    a = _forward_inputs(ctx)
    N = ctx.num_data
    factors = KFACFactors(
        layers=tuple(ctx.layers),
        A=tuple(input_factor_of(layer, ai, N) for layer, ai in zip(ctx.layers, a)),
        B=(None,) * len(a),
        num_data=N,
        kind=None,
    )
    return KroneckerBlockDiagonal(factors, name="Fisher[foof]")

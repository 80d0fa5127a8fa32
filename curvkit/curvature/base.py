"""The immutable curvature snapshot every structure returns.

A :class:`Curvature` is a :class:`~curvkit.linalg.LinearOperator` in *parameter space*: vectors
are the parameters ``F.params`` flattened row-major and concatenated in that order. Internally it
wraps an operator in *layer space*, where layer ``l`` occupies ``vec_r(W̃_l)`` with
``W̃_l = [W_l | b_l]`` (``d_out × d_in``), layers in model order. ``index`` maps the two:
``layer_vector = flat_vector[index]`` (``index=None``: the identity, nothing is permuted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from curvkit.capture import Captured, LayerAdapter
from curvkit.curvature.permutation import LayerPermutation
from curvkit.linalg import LinearOperator
from curvkit.linalg.operator import Damping

FISHER_FORMULAS = {
    "exact": "F = (1/N) Σₙ E_{y∼p(·|xₙ)}[g gᵀ]",
    "mc": "F = (1/(N·S)) Σₙ Σₛ g(ŷₙₛ) g(ŷₙₛ)ᵀ, ŷₙₛ ∼ p(·|xₙ)",
    "empirical": "F = (1/N) Σₙ g(yₙ) g(yₙ)ᵀ",
}


class Curvature(LinearOperator):
    """Fisher curvature of one batch at fixed parameters, with one operator contract.

    ``g = ∇_θ(−log p(y|xₙ, θ))``; the formula of the kind is in :attr:`formula`.

    Attributes:
        params: the parameters (vector layout).
        layers: the supported layers owning them, in model order.
        kind: ``"exact"``, ``"mc"`` or ``"empirical"`` (or ``None`` for loss-free structures).
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        structure: ``"full"``, ``"block_diag"``, ``"kfac"``, ``"foof"``, ``"diag"``, ...
        num_data: ``N``, the batch size the mean Fisher is taken over.
        operator: the layer-space operator.
        captured: per-layer inputs/errors when the structure used them (else ``None``).
        permutation: the parameter ↔ layer-space map (:class:`LayerPermutation`), built from
            ``index``: the flat positions of the layer-space entries, or per layer its flat
            ``(start, stop)`` slice or positions, or ``None`` for the identity.
    """

    def __init__(
        self,
        operator: LinearOperator,
        params: Sequence[nn.Parameter],
        layers: Sequence[LayerAdapter],
        index: Tensor | Sequence[Tensor | tuple[int, int]] | None,
        *,
        kind: str | None,
        likelihood: str,
        structure: str,
        num_data: int,
        captured: Captured | None = None,
        info: dict | None = None,
    ) -> None:
        self.params = list(params)
        super().__init__(
            operator.shape[0], operator.dtype, operator.device,
            block_shapes=[p.shape for p in self.params],
            name=f"Fisher(kind={kind!r}, structure={structure!r})",
        )
        self.operator = operator
        self.layers = list(layers)
        self.kind, self.likelihood, self.structure = kind, likelihood, structure
        self.num_data = int(num_data)
        self.captured = captured
        self.info = dict(info or {})
        self.damping_modes = operator.damping_modes
        self.permutation = LayerPermutation(index, [p.shape for p in self.params], self.device)

    @property
    def index(self) -> Tensor:
        """Flat positions of the layer-space entries: ``layer_vector = flat_vector[index]``."""
        return self.permutation.index

    # ------------------------------------------------------------------ description
    @property
    def formula(self) -> str:
        """The Fisher definition and scaling this operator represents (or approximates)."""
        loss_free = "F ≈ I ⊗ Â, Â = (1/N) Σₙ Σₜ ã ãᵀ (loss-independent)"
        base = FISHER_FORMULAS.get(self.kind, loss_free) if self.kind is not None else loss_free
        return f"{base}, g = ∇θ(−log p(y|x,θ)), likelihood={self.likelihood!r}, N={self.num_data}"

    def __repr__(self) -> str:
        return (f"Curvature(structure={self.structure!r}, kind={self.kind!r}, "
                f"likelihood={self.likelihood!r}, P={self.shape[0]}, N={self.num_data}; "
                f"{self.formula})")

    # ------------------------------------------------------------------ layout
    def to_layer_space(self, X: Tensor) -> Tensor:
        """Flat parameter-space ``(P, k)`` -> layer-space ``(P, k)``."""
        return self.permutation.to_layer(X)

    def from_layer_space(self, Y: Tensor) -> Tensor:
        """Layer-space ``(P, k)`` -> flat parameter-space ``(P, k)``."""
        return self.permutation.from_layer(Y)

    # lists go to layer space in one concatenation and come back as views of the layer-space
    # result where the layout allows it (see :mod:`curvkit.curvature.permutation`)
    def _matmat_list(self, v: list[Tensor] | tuple[Tensor, ...]) -> list[Tensor] | None:
        if not self.permutation.direct_lists:
            return None
        self._check_list(v, "v")
        X = self.permutation.list_to_layer(v, reuse=True)
        return self.permutation.layer_to_list(self.permutation.owned(self.operator._matmat(X), X))

    def _solve_list(self, v: list[Tensor] | tuple[Tensor, ...], damping: Damping,
                    damping_mode: str) -> list[Tensor] | None:
        if not self.permutation.direct_lists:
            return None
        self._check_list(v, "v")
        X = self.permutation.list_to_layer(v, reuse=True)
        self._check_rhs(X)
        Y = self.operator._solve(X, self._layer_damping(damping), damping_mode)
        return self.permutation.layer_to_list(self.permutation.owned(Y, X))

    def layer_matrices(self, v) -> list[Tensor]:
        """Split a vector (any format) into per-layer ``W̃_l`` matrices ``(d_out, d_in)``."""
        X, _ = self._to_matrix(v)
        Y = self.to_layer_space(X)[:, 0]
        return [blk.reshape(l.d_out, l.d_in)
                for l, blk in zip(self.layers, Y.split([l.size for l in self.layers]))]

    def from_layer_matrices(self, mats: Sequence[Tensor]) -> list[Tensor]:
        """Per-layer ``W̃_l`` matrices -> list of tensors shaped like :attr:`params`."""
        Y = torch.cat([m.reshape(-1) for m in mats]).unsqueeze(1)
        return cast(list[Tensor], self._from_matrix(self.from_layer_space(Y), "list"))

    # ------------------------------------------------------------------ contract
    def _matmat(self, X: Tensor) -> Tensor:
        return self.from_layer_space(self.operator._matmat(self.to_layer_space(X)))

    def _layer_damping(self, damping):
        """A per-parameter ``(P,)`` damping in layer order (scalars unchanged)."""
        if isinstance(damping, Tensor):
            return self.to_layer_space(damping[:, None])[:, 0]
        return damping

    def _solve(self, X: Tensor, damping, damping_mode: str) -> Tensor:
        return self.from_layer_space(
            self.operator._solve(self.to_layer_space(X), self._layer_damping(damping), damping_mode))

    def _prepare(self, damping: float, damping_mode: str) -> None:
        self.operator._prepare(damping, damping_mode)

    def _logdet(self, damping) -> Tensor:
        return self.operator._logdet(self._layer_damping(damping))

    # Gaussian methods of the linalg contract, mapped to the layer-space operator
    def _sample(self, k: int, damping, generator: torch.Generator | None) -> Tensor:
        return self.from_layer_space(self.operator._sample(k, self._layer_damping(damping), generator))

    def _inverse_diagonal(self, damping) -> Tensor:
        d = self.operator._inverse_diagonal(self._layer_damping(damping))
        return self.from_layer_space(d[:, None])[:, 0]

    def _inverse_quad_blocks(self, J, R: int, damping) -> Tensor:
        from curvkit.linalg import DenseFactor

        if not self.permutation.identity:
            J = DenseFactor(self.to_layer_space(J.dense(torch.float64)))
        return self.operator._inverse_quad_blocks(J, R, self._layer_damping(damping))

    def _eigenvalues(self) -> Tensor:
        return self.operator.eigenvalues()

    def _is_singular(self) -> bool:
        return self.operator._is_singular()

    def _rank_bound(self) -> int:
        return self.operator._rank_bound()

    def diagonal(self) -> Tensor:
        """The diagonal of ``F`` as a ``(P,)`` tensor, in ``params`` order."""
        d = self.operator.diagonal()
        return self.from_layer_space(d[:, None])[:, 0]

    def to_dense(self) -> Tensor:
        """The explicit ``(P, P)`` matrix ``F`` in ``params`` order."""
        D = self.operator.to_dense()
        if self.permutation.identity:
            return D
        inv = self.permutation.inverse_index
        return D[inv][:, inv]

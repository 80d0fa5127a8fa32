"""Blocks of the posterior precision ``Λ = Λ_p + n·F`` in *layer space*, one class per form.

An :class:`~curvkit.laplace.engines.Engine` is a list of blocks of ``Λ`` along the layer-space
vector (layer ``l`` occupies ``vec_r(W̃_l)``, ``W̃_l = [W_l | b_l]``, see
:class:`~curvkit.curvature.Curvature`). Each block ``b`` is ``Λ_b = diag(δ_b) + n·F_b`` with
``n = num_data`` and ``F_b`` the mean Fisher (or its approximation) of the batch, and knows how to

* ``sample(k)``: ``k`` draws from ``N(0, Λ_b⁻¹)``;
* ``solve(X) = Λ_b⁻¹ X``, ``inverse_diagonal() = diag(Λ_b⁻¹)``, ``logdet() = log det Λ_b``;
* ``eigenvalues()``: the eigenvalues ``λ_i`` of ``n·F_b`` (missing ones are 0), so that for a
  constant ``δ`` on the block ``log det Λ_b = size·log δ + Σ_i log(1 + λ_i/δ)`` -- every prior
  precision from one eigendecomposition.

Blocks:

* :class:`LowRankBlock` -- ``n·F_b = J Jᵀ`` (exact Fisher columns, ``J = √n·G``) through
  :class:`~curvkit.linalg.perturb.DiagonalPlusLowRank` (perturbation sampling, Woodbury);
  ``structure="full"`` is one such block over all layers, ``"block_diag"`` one per layer.
* :class:`KroneckerBlock` -- ``F_b = B ⊗ A`` (KFAC; FOOF with ``B = I``) and a constant ``δ``:
  with ``A = U_A diag(s_A) U_Aᵀ``, ``B = U_B diag(s_B) U_Bᵀ``, ``Λ_b`` is diagonal in the
  eigenbasis ``U_B ⊗ U_A`` with eigenvalues ``n s_B s_Aᵀ + δ`` (``d_out × d_in``).
* :class:`DiagonalBlock` -- ``F_b = diag(d)``: ``Λ_b = diag(δ + n d)``, any elementwise ``δ``.
* :class:`DenseBlock` -- any other (small) block, formed explicitly and Cholesky-factorised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvkit.linalg import (
    DenseFactor,
    Kronecker,
    LinearOperator,
    LowRankFactor,
    OuterProductFactor,
    StackedFactor,
    check_memory,
)
from curvkit.linalg.factor_ops import (
    GemmOuterFactor,
    ScaledFactor,
    dense_columns,
    gram64,
    outer_gram64,
    rank_one_split,
)
from curvkit.linalg.perturb import DiagonalPlusLowRank

__all__ = ["Block", "LowRankBlock", "KroneckerBlock", "DiagonalBlock", "DenseBlock",
           "whiten_layer_factor", "MAX_DENSE_BLOCK"]

#: largest block formed explicitly by :class:`DenseBlock`.
MAX_DENSE_BLOCK = 8192


def _is_constant(x: Tensor) -> bool:
    return bool((x == x[0]).all())


# ====================================================================== whitening of J
def whiten_layer_factor(J: LowRankFactor, delta: Tensor) -> LowRankFactor:
    """``V = diag(δ)^{-1/2} J`` for one layer's factor.

    * :class:`~curvkit.linalg.OuterProductFactor` and ``δ⁻¹ = r cᵀ`` rank one on the layer's
      ``d_out × d_in`` grid (a scalar, or one scalar per weight and bias): the Hadamard trick
      survives, ``V = OuterProductFactor(a ⊙ √c, e ⊙ √r)``.
    * constant ``δ``: ``V = δ^{-1/2} J``.
    * otherwise the per-sample gradients (``P_l × M``) are materialised and scaled (memory
      ``8·P_l·M`` bytes, checked; ``MemoryError`` states the GB).
    """
    delta = delta.to(torch.float64)
    if _is_constant(delta):
        if isinstance(J, OuterProductFactor):
            s = float(delta[0]) ** -0.5
            return GemmOuterFactor(J.a, J.e * s, J.gram_route)
        return ScaledFactor(J, float(delta[0]) ** -0.5)
    if isinstance(J, OuterProductFactor):
        split = rank_one_split((1.0 / delta).reshape(J.d_out, J.d_in))
        if split is not None:
            r, c = split
            return GemmOuterFactor(J.a * c.sqrt().to(J.dtype), J.e * r.sqrt().to(J.dtype),
                                   J.gram_route)
    check_memory(2 * J.size * J.rank * 8,
                 f"the per-sample gradients of a {J.size}-parameter layer for M = {J.rank} Fisher "
                 "columns (needed for an elementwise prior precision that is not constant per "
                 "weight/bias tensor)", J.device)
    cols = dense_columns(J) * delta.rsqrt().to(J.dtype)[:, None]
    return DenseFactor(cols)


# ====================================================================== blocks
class Block:
    """One diagonal block ``Λ_b = diag(δ_b) + n F_b`` of the posterior precision (layer space)."""

    size: int
    delta: Tensor
    dtype: torch.dtype

    def sample(self, k: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def solve(self, X: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse_diagonal(self) -> Tensor:
        raise NotImplementedError

    def logdet(self) -> Tensor:
        raise NotImplementedError

    def eigenvalues(self) -> Tensor | None:
        """Eigenvalues of ``n·F_b`` (float64) or ``None`` if not available."""
        return None

    def logdet_per_layer(self, layer_sizes: Sequence[int]) -> Callable[[Tensor], Tensor] | None:
        """``t ↦ log det(diag(e^{t_l} on layer l) + n F_b)`` (differentiable) for a block spanning
        several layers; ``None`` if not available."""
        return None

    def quad_blocks(self, X: Tensor, R: int) -> Tensor:
        """Per-group ``R × R`` blocks of ``Xᵀ Λ_b⁻¹ X`` for explicit columns ``X`` (float64)."""
        Y = self.solve(X)
        n = X.shape[1] // R
        return torch.einsum("pnr,pnq->nrq", X.reshape(-1, n, R), Y.reshape(-1, n, R))


class LowRankBlock(Block):
    """``Λ_b = diag(δ) + J Jᵀ`` with ``J`` stacked over the layers of the block.

    Args:
        J: per-layer factors of ``J = √n·G`` (unscaled by the prior).
        delta: ``(size,)`` prior precision of the block (layer space).
        route: ``"auto"``, ``"dual"`` or ``"primal"`` (see :mod:`curvkit.linalg.perturb`).
    """

    def __init__(self, J: Sequence[LowRankFactor], delta: Tensor, route: str = "auto",
                 previous: LowRankBlock | None = None) -> None:
        self.J = list(J)
        self.layer_sizes = [f.size for f in self.J]
        self.size = sum(self.layer_sizes)
        self.delta = delta.to(torch.float64)
        self.dtype = self.J[0].dtype
        V = StackedFactor([whiten_layer_factor(f, d)
                           for f, d in zip(self.J, self.delta.split(self.layer_sizes))])
        gram = None
        self._eig: Tensor | None = None
        same_factors = previous is not None and len(previous.J) == len(self.J) and all(
            a is b for a, b in zip(previous.J, self.J))
        if (same_factors and _is_constant(previous.delta)
                and _is_constant(self.delta) and route in ("auto", previous.route)):
            # a scalar δ changed: the core rescales, K_V' = K_V·δ/δ' (no new Gram / P×P product)
            gram = previous.op.gram * (float(previous.delta[0]) / float(self.delta[0]))
            route = previous.route
            self._eig = previous._eig
        self.op = DiagonalPlusLowRank(self.delta, V, route=route, name="Laplace precision", gram=gram)

    @property
    def route(self) -> str:
        return self.op.route

    @property
    def rank(self) -> int:
        return self.J[0].rank

    def sample(self, k, generator):
        return self.op.sample(k, generator)

    def solve(self, X):
        return self.op.solve64(X)

    def inverse_diagonal(self):
        return self.op.inverse_diagonal()

    def logdet(self):
        return self.op.logdet()

    def eigenvalues(self) -> Tensor:
        """Eigenvalues of ``JᵀJ`` (``M × M``) or ``JJᵀ`` (``P × P``), whichever is smaller -- the
        nonzero ones coincide. One eigendecomposition, cached; serves every scalar ``δ``."""
        if self._eig is None:
            P, M = self.size, self.rank
            const = _is_constant(self.delta)
            if self.op.route == "dual" and M <= P:
                K = self.op.gram * float(self.delta[0]) if const else gram64(StackedFactor(self.J))
            elif self.op.route == "primal" and P <= M:
                s = self.delta.sqrt()
                K = s[:, None] * self.op.gram * s[None, :]
            elif M <= P:
                check_memory(2 * M * M * 8, f"the {M}×{M} Gram for the evidence", self.delta.device)
                K = gram64(StackedFactor(self.J))
            else:
                check_memory(2 * P * P * 8, f"the {P}×{P} matrix J Jᵀ for the evidence",
                             self.delta.device)
                K = outer_gram64(StackedFactor(self.J))
            self._eig = torch.linalg.eigvalsh(K).clamp_min(0.0)
        return self._eig

    def logdet_per_layer(self, layer_sizes):
        """Dual: ``Σ_l P_l t_l + log det(I_M + Σ_l e^{−t_l} K_l)``, ``K_l = J_lᵀJ_l`` (cached, ``L·M²``
        floats); primal: ``Σ_l P_l t_l + log det(I_P + D^{-1/2} J Jᵀ D^{-1/2})``."""
        sizes = torch.tensor(list(layer_sizes), dtype=torch.float64, device=self.delta.device)
        if self.op.route == "dual":
            M = self.rank
            check_memory((len(self.J) + 2) * M * M * 8,
                         f"{len(self.J)} per-layer {M}×{M} Grams for per-layer prior optimisation",
                         self.delta.device)
            grams = torch.stack([gram64(f) for f in self.J])
            eye = torch.eye(M, dtype=torch.float64, device=grams.device)

            def fn(t: Tensor) -> Tensor:
                K = eye + torch.einsum("l,lij->ij", torch.exp(-t), grams)
                return (sizes * t).sum() + 2.0 * torch.linalg.cholesky(K).diagonal().log().sum()

            return fn
        s = self.delta.sqrt()
        JJ = s[:, None] * self.op.gram * s[None, :]
        eye = torch.eye(self.size, dtype=torch.float64, device=JJ.device)
        counts = torch.tensor(list(layer_sizes), device=JJ.device)

        def fn_primal(t: Tensor) -> Tensor:
            r = torch.repeat_interleave(torch.exp(-0.5 * t), counts)
            S = eye + r[:, None] * JJ * r[None, :]
            return (sizes * t).sum() + 2.0 * torch.linalg.cholesky(S).diagonal().log().sum()

        return fn_primal

    def quad_blocks_factor(self, Jt: Sequence[LowRankFactor], R: int) -> Tensor:
        """``J_tᵀ Λ_b⁻¹ J_t`` blocks from per-layer test factors (no ``P``-sized intermediates)."""
        Vt = StackedFactor([whiten_layer_factor(f, d)
                            for f, d in zip(Jt, self.delta.split(self.layer_sizes))])
        return self.op.inverse_quad_blocks(Vt, R)


class KroneckerBlock(Block):
    """``Λ_b = δ I + n (B ⊗ A)`` in the eigenbasis ``U_B ⊗ U_A``; eigenvalues ``n s_B s_Aᵀ + δ``."""

    def __init__(self, kron: Kronecker, delta: Tensor, num_data: int, name: str) -> None:
        self.size = kron.shape[0]
        self.delta = delta.to(torch.float64)
        self.dtype = kron.dtype
        if not _is_constant(self.delta):
            raise ValueError(
                f"the Kronecker-factored block of layer {name} needs one prior precision for the "
                f"whole layer (weight and bias share it), got values in [{float(self.delta.min()):.4g},"
                f" {float(self.delta.max()):.4g}]; pass a scalar or per-layer prior, or use "
                "structure='full' or 'diag' for per-parameter priors"
            )
        sA, UA, sB, UB = kron.eig()
        self.d_out, self.d_in = kron.d_out, kron.d_in
        if sB is None:
            sB = torch.ones(self.d_out, dtype=torch.float64, device=sA.device)
            UB = torch.eye(self.d_out, dtype=torch.float64, device=sA.device)
        self.UA, self.UB = UA, UB
        self.ev = num_data * sB[:, None] * sA[None, :]  # eigenvalues of n·F_b, (d_out, d_in)
        self.lam = self.ev + float(self.delta[0])

    # layout: a column block X (P_b, k) of row-major vec_r(G_j) is G as (o, d, k); all products
    # below are single GEMMs on reshaped tensors (no batched tiny matmuls).
    def _to_eig(self, X: Tensor) -> Tensor:
        """``U_Bᵀ G_j U_A`` for every column ``j``: ``(P_b, k) -> (o, k, d)`` (float64)."""
        k = X.shape[1]
        Z = self.UB.T @ X.to(torch.float64).contiguous().reshape(self.d_out, self.d_in * k)
        Z = Z.reshape(self.d_out, self.d_in, k).transpose(1, 2).reshape(self.d_out * k, self.d_in)
        return (Z @ self.UA).reshape(self.d_out, k, self.d_in)

    def _from_eig(self, H: Tensor) -> Tensor:
        """``U_B H_j U_Aᵀ`` for ``H`` of shape ``(o, k, d)``: ``-> (P_b, k)`` (float64)."""
        k = H.shape[1]
        Y = (H.reshape(self.d_out * k, self.d_in) @ self.UA.T).reshape(self.d_out, k * self.d_in)
        Y = (self.UB @ Y).reshape(self.d_out, k, self.d_in)
        return Y.transpose(1, 2).reshape(self.size, k)

    def sample(self, k, generator):
        Z = torch.randn(self.d_out, k, self.d_in, dtype=torch.float64, device=self.lam.device,
                        generator=generator)
        return self._from_eig(Z * self.lam.rsqrt()[:, None, :]).to(self.dtype)

    def solve(self, X):
        return self._from_eig(self._to_eig(X) / self.lam[:, None, :])

    def inverse_diagonal(self):
        return ((self.UB**2) @ (1.0 / self.lam) @ (self.UA**2).T).reshape(-1)

    def logdet(self):
        return self.lam.log().sum()

    def eigenvalues(self):
        return self.ev.reshape(-1)

    def quad_blocks(self, X, R):
        H = self._to_eig(X) * self.lam.rsqrt()[:, None, :]  # (o, k, d)
        n = X.shape[1] // R
        H = H.reshape(self.d_out, n, R, self.d_in).permute(1, 2, 0, 3).reshape(n, R, -1)
        return H @ H.transpose(1, 2)


class DiagonalBlock(Block):
    """``Λ_b = diag(δ + n d)`` (any elementwise ``δ``)."""

    def __init__(self, d: Tensor, delta: Tensor, num_data: int, dtype: torch.dtype) -> None:
        self.size = d.shape[0]
        self.delta = delta.to(torch.float64)
        self.dtype = dtype
        self.ev = num_data * d.to(torch.float64).clamp_min(0.0)
        self.lam = self.delta + self.ev

    def sample(self, k, generator):
        Z = torch.randn(self.size, k, dtype=torch.float64, device=self.lam.device, generator=generator)
        return (Z * self.lam.rsqrt()[:, None]).to(self.dtype)

    def solve(self, X):
        return X.to(torch.float64) / self.lam[:, None]

    def inverse_diagonal(self):
        return 1.0 / self.lam

    def logdet(self):
        return self.lam.log().sum()

    def eigenvalues(self):
        return self.ev


class DenseBlock(Block):
    """``Λ_b = diag(δ) + n F_b`` formed explicitly (``size ≤`` :data:`MAX_DENSE_BLOCK`), Cholesky."""

    def __init__(self, op: LinearOperator, delta: Tensor, num_data: int, name: str) -> None:
        self.size = op.shape[0]
        if self.size > MAX_DENSE_BLOCK:
            raise NotImplementedError(
                f"the curvature block {name} ({type(op).__name__}, {self.size} parameters) has no "
                "factorised form curvkit.laplace knows (Woodbury, Kronecker, Diagonal) and is too "
                f"large (> {MAX_DENSE_BLOCK}) to form explicitly; use structure='full', 'kfac', "
                "'foof' or 'diag'"
            )
        self.delta = delta.to(torch.float64)
        self.dtype = op.dtype
        F = op.to_dense().to(torch.float64)
        self.nF = num_data * 0.5 * (F + F.T)
        L, info = torch.linalg.cholesky_ex(torch.diag(self.delta) + self.nF)
        if int(info) != 0:
            raise FloatingPointError(f"the posterior precision block {name} is not positive definite")
        self.chol = L

    def sample(self, k, generator):
        Z = torch.randn(self.size, k, dtype=torch.float64, device=self.chol.device, generator=generator)
        return torch.linalg.solve_triangular(self.chol.T, Z, upper=True).to(self.dtype)

    def solve(self, X):
        return torch.cholesky_solve(X.to(torch.float64), self.chol)

    def inverse_diagonal(self):
        eye = torch.eye(self.size, dtype=torch.float64, device=self.chol.device)
        return (torch.linalg.solve_triangular(self.chol, eye, upper=False) ** 2).sum(0)

    def logdet(self):
        return 2.0 * self.chol.diagonal().log().sum()

    def eigenvalues(self):
        return torch.linalg.eigvalsh(self.nF).clamp_min(0.0)

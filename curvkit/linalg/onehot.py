"""A layer factor whose inputs are one-hot vectors given by their indices (embedding lookups).

An embedding ``y_{nt} = W[i_{nt}]`` (``W`` of shape ``(V, d)``) is a linear layer on the one-hot
input ``a_{nt} = 1_{i_{nt}} ∈ R^V``: the block ``W̃ = Wᵀ`` (``d × V``) and column ``m = n·R + r``
of ``G`` restricted to the layer is ``vec_r(Σ_t e_{mt} 1_{i_{nt}}ᵀ)``, i.e. column ``v`` of the
``d × V`` gradient is ``Σ_{t: i_{nt} = v} e_{mt}``. :class:`OneHotFactor` gives every product of
that factor from the indices, never forming the ``(N·T, V)`` one-hots nor ``P × M`` gradients:

* ``Uᵀ X`` -- gathers ``X[:, i_{nt}]`` (``index_select``) and contracts with ``e``;
* ``U W`` -- scatters ``Σ_m W_m e_{mt}`` to the rows ``i_{nt}`` (``index_add``);
* the Gram ``K = Uᵀ U`` and ``diag(U Uᵀ)`` -- from the per-column gradients restricted to the
  tokens present in the batch (``M × U·d`` with ``U ≤ min(V, N·T)`` distinct indices), built and
  multiplied in chunks of tokens of about :data:`~curvkit.linalg.lowrank.CHUNK_BYTES`, so the
  memory stays bounded: ``K_{mm'} = Σ_v g_{m,v} · g_{m',v}``.

Index ``−1`` marks a location with no row (an embedding's ``padding_idx``, whose gradient is
zero). Row ``p = o·V + v`` of ``U`` is entry ``(o, v)`` of the block (row-major), as for every
layer factor. float64 products use a float64 copy of the errors (the indices are exact).
"""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import override

from curvkit.linalg.lowrank import CHUNK_BYTES, LowRankFactor

__all__ = ["OneHotFactor"]


class OneHotFactor(LowRankFactor):
    """Layer factor ``U`` (``d·V × M``) with one-hot inputs given by indices (module docstring).

    Args:
        idx: ``(N, T)`` integer indices in ``[0, V)``, ``−1`` for locations without a row.
        e: ``(M, T, d)`` errors, ``M = N·R`` (the Fisher scaling folded in).
        num_rows: ``V``, the number of one-hot classes (embedding rows).

    Raises:
        ValueError: shapes that do not match.
    """

    def __init__(self, idx: Tensor, e: Tensor, num_rows: int) -> None:
        if idx.dim() != 2 or e.dim() != 3 or e.shape[1] != idx.shape[1] \
                or e.shape[0] % max(1, idx.shape[0]):
            raise ValueError(f"OneHotFactor needs indices (N, T) and errors (N·R, T, d), got "
                             f"{tuple(idx.shape)} and {tuple(e.shape)}")
        self.idx, self.e, self.V = idx.long(), e, int(num_rows)
        self.N, self.T, self.d = idx.shape[0], idx.shape[1], e.shape[2]
        self.R = e.shape[0] // max(1, self.N)
        self.size, self.rank = self.d * self.V, e.shape[0]
        self.dtype, self.device = e.dtype, e.device
        flat = self.idx.reshape(-1)
        self._valid = flat >= 0
        self._rows = flat.clamp_min(0)
        self._f64: OneHotFactor | None = None

    # ------------------------------------------------------------------ products
    def _steps(self, k: int, per: int) -> range:
        return range(0, k, max(1, CHUNK_BYTES // max(1, 8 * per)))

    @override
    def rmatmat(self, X: Tensor) -> Tensor:
        k = X.shape[1]
        e4 = self.e.reshape(self.N, self.R, self.T, self.d)
        mask = self._valid.to(X.dtype).reshape(1, self.N, self.T, 1)
        step = self._steps(k, self.N * self.T * self.d).step
        out = []
        for j in range(0, k, step):
            Xg = X[:, j:j + step].reshape(self.d, self.V, -1).index_select(1, self._rows)
            Xg = Xg.reshape(self.d, self.N, self.T, -1) * mask  # X[o, i_nt, j]
            out.append(torch.einsum("nrto,ontj->nrj", e4.to(X.dtype), Xg).reshape(self.rank, -1))
        return torch.cat(out, 1) if out else X.new_zeros(self.rank, 0)

    @override
    def matmat(self, W: Tensor) -> Tensor:
        k = W.shape[1]
        e4 = self.e.reshape(self.N, self.R, self.T, self.d).to(W.dtype)
        keep = self._valid.nonzero()[:, 0]
        rows = self._rows[keep]
        step = self._steps(k, self.N * self.T * self.d).step
        out = []
        for j in range(0, k, step):
            Wj = W[:, j:j + step].reshape(self.N, self.R, -1)
            ew = torch.einsum("nrto,nrj->ntoj", e4, Wj).reshape(self.N * self.T, self.d, -1)
            acc = W.new_zeros(self.V, self.d, Wj.shape[2])
            acc = acc.index_add(0, rows, ew.index_select(0, keep))  # out of place: autograd
            out.append(acc.permute(1, 0, 2).reshape(self.size, -1))
        return torch.cat(out, 1) if out else W.new_zeros(self.size, 0)

    def _token_chunks(self):
        """``(tokens (c,), G (M, c, d))``: the columns' gradients restricted to chunks of tokens."""
        keep = self._valid.nonzero()[:, 0]
        tokens, inv = torch.unique(self._rows[keep], return_inverse=True)
        n_loc, t_loc = keep // self.T, keep % self.T
        c = max(1, CHUNK_BYTES // max(1, 8 * self.rank * self.d))
        e4 = self.e.reshape(self.N, self.R, self.T, self.d)
        r = torch.arange(self.R, device=self.device)
        for u0 in range(0, tokens.numel(), c):
            u1 = min(u0 + c, tokens.numel())
            sel = ((inv >= u0) & (inv < u1)).nonzero()[:, 0]
            G = self.e.new_zeros(self.rank * (u1 - u0), self.d)
            target = ((n_loc[sel, None] * self.R + r) * (u1 - u0) + (inv[sel, None] - u0))
            G.index_add_(0, target.reshape(-1), e4[n_loc[sel], :, t_loc[sel], :].reshape(-1, self.d))
            yield tokens[u0:u1], G.reshape(self.rank, u1 - u0, self.d)

    @override
    def gram(self) -> Tensor:
        K = self.e.new_zeros(self.rank, self.rank)
        for _, G in self._token_chunks():
            flat = G.reshape(self.rank, -1)
            K.addmm_(flat, flat.T)
        return 0.5 * (K + K.T)

    @override
    def sq_row_norms(self) -> Tensor:
        out = self.e.new_zeros(self.d, self.V)
        for tok, G in self._token_chunks():
            out[:, tok] = (G * G).sum(0).T
        return out.reshape(-1)

    @override
    def gram_flops(self) -> float:
        return 2.0 * self.rank**2 * min(self.V, self.N * self.T) * self.d

    # ------------------------------------------------------------------ float64
    @override
    def to64(self) -> OneHotFactor:
        if self.dtype == torch.float64:
            return self
        if self._f64 is None:
            self._f64 = OneHotFactor(self.idx, self.e.to(torch.float64), self.V)
        return self._f64

    @override
    def columns64(self, start: int, stop: int) -> Tensor:
        return self.to64().columns(start, stop)

    @override
    def gram64(self) -> Tensor:
        return self.to64().gram()

    @override
    def rmatmat64(self, X: Tensor) -> Tensor:
        return self.to64().rmatmat(X.to(torch.float64))

    @override
    def sub_matmat64(self, X: Tensor, W: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
        Y = X.to(torch.float64, copy=True)
        Y -= self.to64().matmat(W.to(torch.float64))
        Y *= scale
        return Y.to(X.dtype) if out is None else out.copy_(Y)

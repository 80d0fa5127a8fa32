"""The per-layer factor of a subsampled Fisher: columns are sums of outer products.

Index letters used throughout (declared once):

* ``n`` -- input (datapoint) index, ``N`` of them;
* ``r`` -- repeat index per input (label / MC sample / output seed), ``R`` of them, so the
  ``M = N·R`` columns are ordered input-major, ``m = n·R + r``;
* ``t`` -- location index (``T = 1`` for a dense layer, ``H_out·W_out`` for a convolution);
* ``o`` -- output unit (``d_out``), ``d`` -- input feature (``d_in``, incl. a ones column for a bias);
* ``k`` -- right-hand side index.

Column ``m = (n, r)`` of the layer factor ``U`` is ``vec_r(Σ_t e_{n r t} a_{n t}ᵀ)`` (row-major
``d_out × d_in``), i.e. the per-sample gradient of that column (Benzing 2022, App. I; for convolutions the
per-sample gradient is a sum over locations). Scalars such as
``1/√N`` or ``√p`` are already folded into ``e``. Then (App. I, eqs 21–23)::

    (Uᵀ X)_m   = Σ_t e_{mt}ᵀ V a_{n t}                     V = mat_r(X)
    (U w)      = vec_r( Σ_{n,t} (Σ_r w_{nr} e_{nrt}) a_{nt}ᵀ )
    K_{m m'}   = Σ_{t,t'} (a_{nt}·a_{n't'}) (e_{mt}·e_{m't'})  (Hadamard of Grams when T = 1)

For ``T > 1`` the Gram uses either the location-Gram route or the per-sample-gradient route,
whichever needs fewer flops (both exact).
"""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import override

from curvkit.linalg.lowrank import CHUNK_BYTES, LowRankFactor, rank_one_split
from curvkit.linalg.memory import check_memory, scratch
from curvkit.linalg.outer_quad import WeightedBlockGrams

#: Entries of the float64 row-chunk buffer of the float64-accumulated products (2 MB).
CHUNK64 = 2**18
#: Entries of the float64 buffer when several right-hand sides share one batched GEMM (32 MB).
BATCH64 = 2**22


def colmajor(X: Tensor) -> Tensor:
    """``X`` (``P × k``) with column-major storage (a transposed view of a contiguous ``k × P``).

    Layer factors reshape ``Xᵀ`` into ``(k, d_out, d_in)`` matrices; with this layout that is a
    view and the batched GEMM runs at full speed.
    """
    return X if X.dim() != 2 or X.stride(0) == 1 else X.T.contiguous().T


class OuterProductFactor(WeightedBlockGrams, LowRankFactor):
    """Layer factor ``U`` from inputs ``a (N, T, d_in)`` and errors ``e (N·R, T, d_out)``.

    Args:
        a: layer inputs (unfolded patches for a convolution; with a ones column for a bias).
        e: back-propagated errors with all scalings folded in, ``R`` columns per input,
            ordered input-major.
        gram_route: ``"auto"``, ``"hadamard"`` (location Gram) or ``"per_sample"``.
    """

    def __init__(self, a: Tensor, e: Tensor, gram_route: str = "auto") -> None:
        if a.dim() != 3 or e.dim() != 3:
            raise ValueError(f"a and e must be 3-D (N, T, d), got {tuple(a.shape)}, {tuple(e.shape)}")
        N, T, d_in = a.shape
        M, T2, d_out = e.shape
        if T2 != T or M % N != 0:
            raise ValueError(f"incompatible a {tuple(a.shape)} and e {tuple(e.shape)}")
        if gram_route not in ("auto", "hadamard", "per_sample"):
            raise ValueError(f"gram_route must be auto/hadamard/per_sample, got {gram_route!r}")
        self.a, self.e = a, e
        self.N, self.R, self.T, self.d_in, self.d_out = N, M // N, T, d_in, d_out
        self.size, self.rank = d_out * d_in, M
        self.dtype, self.device = e.dtype, e.device
        if gram_route == "auto":
            gram_route = self.cheaper_gram_route()
        self.gram_route = gram_route
        self._f64: OuterProductFactor | None = None
        self._G64: Tensor | bool | None = None  # explicit float64 columns: None = not decided yet

    def cheaper_gram_route(self) -> str:
        """Pick the Gram route with fewer flops (``T = 1``: always Hadamard)."""
        if self.T == 1:
            return "hadamard"
        N, M, T = self.N, self.rank, self.T
        hadamard = (N * N * self.d_in + M * M * self.d_out) * T * T + M * M * T * T
        per_sample = M * T * self.d_in * self.d_out + M * M * self.d_in * self.d_out
        return "hadamard" if hadamard <= per_sample else "per_sample"

    # ------------------------------------------------------------------ products
    @override
    def rmatmat(self, X: Tensor) -> Tensor:
        k = X.shape[1]
        if self.T == 1 and self.R == 1:  # one GEMM with k folded into rows, then a row sum
            VA = torch.matmul(X.T.reshape(k, self.d_out, self.d_in), self.a[:, 0, :].T)  # (k, o, N)
            return (VA * self.e[:, 0, :].T).sum(1).T.contiguous()
        if self.T == 1:  # one GEMM over (k·o) rows, then one batched GEMM over inputs n
            V = colmajor(X).T.reshape(k * self.d_out, self.d_in)
            VA = (self.a[:, 0, :] @ V.T).view(self.N, k, self.d_out)
            e = self.e[:, 0, :].reshape(self.N, self.R, self.d_out)
            return torch.bmm(e, VA.transpose(1, 2)).reshape(self.rank, k)
        V = X.T.reshape(k, self.d_out, self.d_in)
        e = self.e.reshape(self.N, self.R, self.T, self.d_out)
        step = max(1, CHUNK_BYTES // max(1, 8 * self.N * self.T * self.d_out))  # bounds VA
        out = []
        for j in range(0, k, step):
            VA = torch.einsum("ntd,kod->ntok", self.a, V[j:j + step])  # (N, T, o, step)
            out.append(torch.einsum("nrto,ntok->nrk", e, VA).reshape(self.rank, -1))
        return torch.cat(out, 1) if out else X.new_zeros(self.rank, 0)

    def _rhs_step(self, element_size: int) -> int:
        """Right-hand sides per chunk so that ``Ẽ`` (``k × d_out × N·T``) stays ≤ ``CHUNK_BYTES``."""
        return max(1, CHUNK_BYTES // max(1, element_size * self.d_out * self.N * self.T))

    @override
    def matmat(self, W: Tensor) -> Tensor:
        k = W.shape[1]
        if self.dtype == torch.float64 and W.dtype == torch.float64:
            G = self.explicit64()
            if G is not None:
                return G.T @ W
        step = self._rhs_step(W.element_size())
        if k > step:  # many right-hand sides (e.g. draws): chunks, column-major result
            out = torch.empty(k, self.size, dtype=W.dtype, device=W.device)
            for j in range(0, k, step):
                out[j:j + step] = self.matmat(W[:, j:j + step]).T
            return out.T
        Wr = W.reshape(self.N, self.R, k)
        if self.T == 1:  # (Σ_r W_{nrk} e_{nr}) by a batched GEMM, then one GEMM with a
            Ew = torch.bmm(Wr.transpose(1, 2), self.e[:, 0, :].reshape(self.N, self.R, self.d_out))
            out = Ew.reshape(self.N, k * self.d_out).T @ self.a[:, 0, :]  # (k·o, d)
            return out.reshape(k, self.size).T
        e = self.e.reshape(self.N, self.R, self.T, self.d_out)
        Ew = torch.einsum("nrk,nrto->knto", Wr, e).reshape(k, self.N * self.T, self.d_out)
        A = self.a.reshape(self.N * self.T, self.d_in)
        out = torch.matmul(Ew.transpose(1, 2), A)  # (k, o, d)
        return out.reshape(k, self.size).T

    def columns(self, start: int, stop: int) -> Tensor:
        """``U[:, start:stop]``: the per-column gradients ``vec_r(Σ_t e_{mt} a_{nt}ᵀ)``."""
        n = torch.arange(start, stop, device=self.device) // self.R
        g = torch.einsum("mto,mtd->mod", self.e[start:stop], self.a[n])
        return g.reshape(stop - start, self.size).T

    def per_sample_gradients(self) -> Tensor:
        """``(M, d_out, d_in)`` per-column gradients ``Σ_t e_{mt} a_{n t}ᵀ`` (materialised)."""
        check_memory(self.rank * self.size * self.e.element_size() * 2,
                     f"per-sample gradients of a {self.d_out}×{self.d_in} layer", self.device)
        e = self.e.reshape(self.N, self.R, self.T, self.d_out)
        return torch.einsum("nrto,ntd->nrod", e, self.a).reshape(self.rank, self.d_out, self.d_in)

    @override
    def gram(self) -> Tensor:
        if self.gram_route == "per_sample":  # K = Σ over row chunks o' of G_{o'} G_{o'}ᵀ
            N, R, T, o, d, M = self.N, self.R, self.T, self.d_out, self.d_in, self.rank
            K = torch.zeros(M, M, dtype=self.dtype, device=self.device)
            e = self.e.reshape(N, R, T, o)
            rows = max(1, 4 * CHUNK64 // (M * d))  # (M, rows·d) gradient rows per chunk
            for i in range(0, o, rows):
                n = min(rows, o - i)
                ei = e[..., i:i + n].permute(0, 1, 3, 2).reshape(N, R * n, T)
                g = scratch("outer.G", (N, R * n, d), self.dtype, self.device)
                torch.bmm(ei, self.a, out=g)  # per-sample gradients of rows i … i+n
                g = g.view(M, n * d)
                K.addmm_(g, g.T)
            return K
        if self.T == 1:
            Ka = self.a[:, 0, :] @ self.a[:, 0, :].T
            Ke = self.e[:, 0, :] @ self.e[:, 0, :].T
            if self.R > 1:
                Ka = Ka.repeat_interleave(self.R, 0).repeat_interleave(self.R, 1)
            return Ka * Ke
        return self._location_gram()

    def _location_gram(self) -> Tensor:
        """``K_{mm'} = Σ_{t,t'} (a_{nt}·a_{n't'})(e_{mt}·e_{m't'})``, chunked over inputs."""
        N, R, T = self.N, self.R, self.T
        M = self.rank
        K = torch.empty(M, M, dtype=self.dtype, device=self.device)
        per_pair = R * R * T * T * self.e.element_size() * 3
        c = max(1, int((CHUNK_BYTES / per_pair) ** 0.5))
        e = self.e.reshape(N, R, T, self.d_out)
        for i in range(0, N, c):
            ai, ei = self.a[i : i + c], e[i : i + c]
            for j in range(0, N, c):
                aj, ej = self.a[j : j + c], e[j : j + c]
                Ka = torch.einsum("itd,jsd->ijts", ai, aj)
                Ke = torch.einsum("irto,jqso->irjqts", ei, ej)
                blk = torch.einsum("irjqts,ijts->irjq", Ke, Ka)
                ni, nj = ai.shape[0], aj.shape[0]
                K[i * R : (i + ni) * R, j * R : (j + nj) * R] = blk.reshape(ni * R, nj * R)
        return K

    @override
    def sq_row_norms(self) -> Tensor:
        if self.T == 1:
            e2 = (self.e[:, 0, :] ** 2).reshape(self.N, self.R, self.d_out).sum(1)  # (N, o)
            return (e2.T @ self.a[:, 0, :] ** 2).reshape(-1)
        out = torch.zeros(self.d_out, self.d_in, dtype=self.dtype, device=self.device)
        c = max(1, int(CHUNK_BYTES / max(1, self.R * self.size * self.e.element_size())))
        e = self.e.reshape(self.N, self.R, self.T, self.d_out)
        for i in range(0, self.N, c):
            g = torch.einsum("nrto,ntd->nrod", e[i : i + c], self.a[i : i + c])
            out += (g**2).sum((0, 1))
        return out.reshape(-1)

    # ------------------------------------------------------------------ float64 accumulation
    # Used by Woodbury solves (see :meth:`curvkit.linalg.Woodbury.solve` for the error analysis):
    # the products run on float64 copies of ``a`` and ``e`` (small: ``N·T·d_in + M·T·d_out``)
    # and, for dense layers, on float64 row chunks of ``X`` (``CHUNK64`` entries), so no
    # ``P``-sized float64 tensor is allocated.
    def _as64(self) -> OuterProductFactor:
        """This factor with float64 copies of ``a`` and ``e`` (cached; ``self`` when float64)."""
        if self.dtype == torch.float64:
            return self
        if self._f64 is None:  # contiguous, so the (N·T, d) views of the products copy nothing
            a = self.a.to(torch.float64, memory_format=torch.contiguous_format)
            e = self.e.to(torch.float64, memory_format=torch.contiguous_format)
            self._f64 = OuterProductFactor(a, e, self.gram_route)
        return self._f64

    @override
    def columns64(self, start: int, stop: int) -> Tensor:
        return self._as64().columns(start, stop)

    def gram64(self) -> Tensor:
        """``K = Uᵀ U`` accumulated in float64 (Hadamard of float64 Grams for dense layers)."""
        f = self._as64()
        if f.gram_route == "per_sample" or f.T != 1:
            return f.gram()
        a, e = f.a[:, 0, :], f.e[:, 0, :]
        K = e @ e.T
        K.view(f.N, f.R, f.N, f.R).mul_((a @ a.T)[:, None, :, None])
        return K

    @override
    def add_gram64_(self, K: Tensor) -> Tensor:
        f = self._as64()
        if f.gram_route == "per_sample" or f.T != 1:
            return K.add_(f.gram())
        a, e = f.a[:, 0, :], f.e[:, 0, :]  # K += (e eᵀ) ⊙ (a aᵀ ⊗ 1_R 1_Rᵀ), one fused pass
        K.view(f.N, f.R, f.N, f.R).addcmul_((e @ e.T).view(f.N, f.R, f.N, f.R),
                                            (a @ a.T)[:, None, :, None])
        return K

    def explicit64(self) -> Tensor | None:
        """``U`` as an explicit ``(M, P)`` float64 matrix when that is the cheaper route (cached).

        With ``T > 1`` locations a product through ``(a, e)`` costs ``2·N·T·P`` flops per
        right-hand side, through the explicit columns ``2·M·P``: fewer when ``R < T``. They are
        formed (``2·M·T·P`` flops, once) only when they are no larger than the stored ``a`` and
        ``e`` (``M·P ≤ N·T·d_in + M·T·d_out``), so the memory at most doubles. ``None`` otherwise
        (and for ``T = 1``, where the location route is already ``2·N·P``).
        """
        if self._G64 is None:
            N, R, T, M = self.N, self.R, self.T, self.rank
            small = M * self.size <= N * T * self.d_in + M * T * self.d_out
            self._G64 = self._as64().per_sample_gradients().reshape(M, self.size) \
                if T > 1 and R < T and small else False
        return self._G64 if isinstance(self._G64, Tensor) else None

    def _explicit_step(self) -> int:
        """Right-hand sides per chunk of the explicit route (a ``P × step`` float64 copy of ``X``)."""
        return max(1, CHUNK_BYTES // (8 * self.size))

    def rmatmat64(self, X: Tensor) -> Tensor:
        """``Uᵀ X`` accumulated in float64; ``X`` ``(P, k)`` of any float dtype -> ``(M, k)`` float64.

        ``X`` is widened in row chunks of ``V_k = mat_r(X[:, k])`` (``CHUNK64`` entries), so no
        ``P``-sized float64 copy is made; with ``A = a`` as ``(N·T, d_in)`` rows,
        ``u_{nr} = Σ_t e_{nrt}ᵀ (V a_{nt})`` takes one GEMM ``V_chunk Aᵀ`` per chunk.
        """
        f, G = self._as64(), self.explicit64()
        if G is not None:  # explicit columns (T > 1): X widened in chunks of right-hand sides
            step = self._explicit_step()
            return torch.cat([G @ X[:, j:j + step].to(torch.float64)
                              for j in range(0, X.shape[1], step)], dim=1)
        if X.dtype == torch.float64:  # float64 X: the plain GEMMs of the float64 factor
            return f.rmatmat(X)
        k, o, d, N, R, T = X.shape[1], self.d_out, self.d_in, self.N, self.R, self.T
        V = X.T.reshape(k, o, d)  # (k, o, d): V_k = mat_r(X[:, k]), a view for k = 1
        rows = max(1, CHUNK64 // (k * d))
        buf = scratch("outer.V", (k, min(rows, o), d), torch.float64, self.device)
        if R == 1 and T == 1:  # u_n = Σ_d (E V)_{nd} a_{nd}: E V accumulated over row chunks of V
            a, e = f.a[:, 0, :], f.e[:, 0, :]
            EV = torch.zeros(k, self.rank, d, dtype=torch.float64, device=self.device)
            for i in range(0, o, rows):
                n = min(rows, o - i)
                EV.baddbmm_(e[:, i:i + n].expand(k, -1, -1), buf[:, :n].copy_(V[:, i:i + n]))
            return torch.einsum("knd,nd->nk", EV, a)
        A = f.a.reshape(N * T, d)
        out = torch.zeros(N, R, k, dtype=torch.float64, device=self.device)
        e = f.e.reshape(N, R, T, o)
        for i in range(0, o, rows):  # u_{nr} = Σ_t e_{nrt}ᵀ (V a_{nt}), V A over row chunks of V
            n = min(rows, o - i)
            VA = scratch("outer.VA", (k, n, N * T), torch.float64, self.device)
            torch.matmul(buf[:, :n].copy_(V[:, i:i + n]), A.T, out=VA)
            VA = VA.view(k, n, N, T)
            out += torch.einsum("nrto,kont->nrk", e[..., i:i + n], VA)
        return out.reshape(self.rank, k)

    def sub_matmat64(self, X: Tensor, W: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
        """``scale · (X − U W)`` accumulated in float64, rounded once to ``X.dtype`` (into ``out``).

        ``U W = vec_r(Ẽᵀ A)`` with ``Ẽ_{k,(n,t)} = Σ_r W_{nr,k} e_{nrt}`` and ``A = a`` as
        ``(N·T, d_in)`` rows: one GEMM accumulated into a float64 copy of a row chunk of ``X``
        (or of several right-hand sides), so no ``P``-sized float64 temporary is made.
        """
        f = self._as64()
        W = W.to(torch.float64)
        if out is None:
            out = torch.empty_like(X)
        k, o, d, N, R, T = X.shape[1], self.d_out, self.d_in, self.N, self.R, self.T
        G = self.explicit64()
        if G is not None:  # explicit columns (T > 1): scale·(X − Gᵀ W) per chunk of columns
            step = self._explicit_step()
            for j in range(0, k, step):
                Y = X[:, j:j + step].to(torch.float64, copy=True)
                out[:, j:j + step] = Y.addmm_(G.T, W[:, j:j + step], beta=scale, alpha=-scale)
            return out
        step = self._rhs_step(8)
        if k > step:  # bounds the (k, o, N·T) float64 Ẽ; out's columns are views (one split)
            for j in range(0, k, step):
                self.sub_matmat64(X[:, j:j + step], W[:, j:j + step], scale, out=out[:, j:j + step])
            return out
        a = f.a.reshape(N * T, d)
        Ew = torch.einsum("nrk,nrto->kont", W.reshape(N, R, k), f.e.reshape(N, R, T, o))
        Ew = Ew.reshape(k, o, N * T)  # (k, o, N·T)
        Xv, Ov = X.T.reshape(k, o, d), out.T.reshape(k, o, d)  # views (split of one dimension)
        if k > 1 and o * d <= BATCH64:  # small blocks: several right-hand sides per batched GEMM
            kk = max(1, BATCH64 // (o * d))
            for j in range(0, k, kk):
                jj = min(kk, k - j)
                Y = Xv[j:j + jj].to(torch.float64, copy=True)  # never the caller's X
                Y.baddbmm_(Ew[j:j + jj], a.expand(jj, -1, -1), beta=scale, alpha=-scale)
                Ov[j:j + jj].copy_(Y)
            return out
        rows = max(1, CHUNK64 // d)
        buf = scratch("outer.X", (min(rows, o), d), torch.float64, self.device)
        for j in range(k):
            for i in range(0, o, rows):
                n = min(rows, o - i)
                Yi = buf[:n].copy_(Xv[j, i:i + n])
                Yi.addmm_(Ew[j, i:i + n], a, beta=scale, alpha=-scale)  # scale·(X − Σ_n ẽ_n a_nᵀ)
                Ov[j, i:i + n].copy_(Yi)
        return out

    # Laplace draws (dense layers): the working copy of k rows is (d_in, k, d_out), so that
    # Uᵀ Y is a GEMM a·Y and Y − U W a GEMM aᵀ·Ew accumulated into it, neither transposed, over
    # chunks of c rows that keep the (N, c, d_out) temporaries within CHUNK64 (cache-sized).
    @override
    def block64(self, Y: Tensor, buf: Tensor | None = None) -> Tensor:
        if self.T != 1:
            return super().block64(Y, buf)
        k, shape = Y.shape[0], (self.d_in, Y.shape[0], self.d_out)
        B = torch.empty(shape, dtype=torch.float64, device=Y.device) if buf is None \
            else buf.view(shape)
        return B.copy_(Y.reshape(k, self.d_out, self.d_in).permute(2, 0, 1))

    @override
    def block_rmatmat64(self, B: Tensor) -> Tensor:
        if self.T != 1:
            return super().block_rmatmat64(B)
        f, k, o = self._as64(), B.shape[1], self.d_out
        a, e = f.a[:, 0, :], f.e[:, 0, :].reshape(self.N, self.R, o)
        out = torch.empty(self.N, self.R, k, dtype=torch.float64, device=B.device)
        c = max(1, min(k, CHUNK64 // max(1, self.N * o)))  # (N, c, o) temporaries ≤ CHUNK64
        for j in range(0, k, c):  # (Y_k a_n)_o for c right-hand sides, then e_{nr}·
            cc = min(c, k - j)
            VA = scratch("outer.VA", (self.N, cc * o), torch.float64, B.device)
            torch.mm(a, B[:, j:j + cc].reshape(self.d_in, -1), out=VA)
            out[:, :, j:j + cc] = torch.bmm(e, VA.view(self.N, cc, o).transpose(1, 2))
        return out.view(self.rank, k)

    @override
    def block_sub_matmat64_(self, B: Tensor, W: Tensor, scale: float) -> None:
        if self.T != 1:
            return super().block_sub_matmat64_(B, W, scale)
        f, k, o = self._as64(), B.shape[1], self.d_out
        a, e, W = f.a[:, 0, :], f.e[:, 0, :], W.to(torch.float64)
        c = max(1, min(k, CHUNK64 // max(1, self.N * o)))  # (N, c, o) temporaries ≤ CHUNK64
        buf = scratch("outer.Ew", (self.N, c, o), torch.float64, B.device)
        for j in range(0, k, c):
            cc = min(c, k - j)
            Wj, Ew = W[:, j:j + cc], (buf if cc == c else buf[:, :cc].contiguous())
            if self.R == 1:  # Ew_{nk} = Σ_r W_{nr,k} e_{nr}, (N, c, o)
                torch.mul(Wj[:, :, None], e[:, None, :], out=Ew)
            else:
                torch.bmm(Wj.reshape(self.N, self.R, cc).transpose(1, 2), e.reshape(self.N, self.R, o),
                          out=Ew)
            B[:, j:j + cc].view(self.d_in, -1).addmm_(a.T, Ew.view(self.N, -1), beta=scale, alpha=-scale)
        return None

    @override
    def block_store(self, B: Tensor, out: Tensor, r: Tensor | None = None) -> None:
        if self.T != 1:
            return super().block_store(B, out, r)
        if r is not None:
            B.mul_(r.to(B).view(self.d_out, self.d_in).T[:, None, :])
        out.view(out.shape[0], self.d_out, self.d_in).copy_(B.permute(1, 2, 0))
        return None

    # ------------------------------------------------------------------ float64 Grams (Laplace)
    @override
    def to64(self) -> LowRankFactor:
        return self._as64()

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The explicit ``(P, M)`` factor: the per-sample gradients, transposed."""
        dtype = dtype or self.dtype
        check_memory(self.size * self.rank * torch.finfo(dtype).bits // 8,
                     f"the explicit {self.size}×{self.rank} factor", self.device)
        return self.per_sample_gradients().reshape(self.rank, -1).T.to(dtype)


    @override
    def gram_flops(self) -> float:
        M = self.rank
        if self.T == 1:
            return 2.0 * (self.N**2 * self.d_in + M**2 * self.d_out) + M**2
        if self.gram_route == "hadamard":
            return 2.0 * (self.N**2 * self.d_in + M**2 * self.d_out) * self.T**2
        return 2.0 * (M * self.T * self.size + M**2 * self.size)

    @override
    def cross_gram64(self, other: LowRankFactor) -> Tensor:
        if isinstance(other, OuterProductFactor) and self.T == 1 and other.T == 1:
            Ka = self.a[:, 0, :].double() @ other.a[:, 0, :].double().T
            Ke = self.e[:, 0, :].double() @ other.e[:, 0, :].double().T
            Ke.view(self.N, self.R, other.N, other.R).mul_(Ka[:, None, :, None])
            return Ke
        if self.T > 1 and 8 * self.size * self.rank <= CHUNK_BYTES:
            # locations: products through a, e cost T× the explicit factor's, formed once here
            return self.dense(torch.float64).T @ other.dense(torch.float64)
        return super().cross_gram64(other)

    @override
    def block_grams64(self, R: int) -> Tensor:
        if self.T == 1 and self.R == R:
            aa = (self.a[:, 0, :].double() ** 2).sum(1)
            e = self.e[:, 0, :].double().reshape(self.N, R, self.d_out)
            return aa[:, None, None] * (e @ e.transpose(1, 2))
        return super().block_grams64(R)

    def rotated(self, U_in: Tensor | None, U_out: Tensor | None) -> OuterProductFactor:
        """The float64 factor of ``(U_out ⊗ U_in)ᵀ U``: inputs ``a U_in``, errors ``e U_out``.

        ``G ↦ U_outᵀ G U_in`` per column (``None`` = identity), e.g. a Kronecker eigenbasis.
        """
        a, e = self.a.to(torch.float64), self.e.to(torch.float64)
        return OuterProductFactor(a if U_in is None else a @ U_in.to(a),
                                  e if U_out is None else e @ U_out.to(e), self.gram_route)

    def whiten(self, r: Tensor) -> LowRankFactor:
        """``diag(r) U``, in layer form where possible.

        The layer form is kept when ``r²`` is rank one on the ``d_out × d_in`` grid (a scalar, or
        one scalar per weight and bias): ``OuterProductFactor(a ⊙ √c, e ⊙ √ρ)``.
        """
        r = r.to(torch.float64)
        if bool((r == r[0]).all()):
            return OuterProductFactor(self.a, self.e * float(r[0]), self.gram_route)
        split = rank_one_split((r**2).reshape(self.d_out, self.d_in))
        if split is not None:
            rho, c = split
            return OuterProductFactor(self.a * c.sqrt().to(self.dtype),
                                      self.e * rho.sqrt().to(self.dtype), self.gram_route)
        return super().whiten(r)


def as_outer(J: LowRankFactor) -> tuple[OuterProductFactor, float] | None:
    """``(f, s)`` with ``J = s·f`` for a layer factor ``f`` (possibly scaled), else ``None``."""
    from curvkit.linalg.lowrank import ScaledFactor, StackedFactor

    scale = 1.0
    while True:
        if isinstance(J, OuterProductFactor):
            return J, scale
        if isinstance(J, ScaledFactor):
            scale *= J.scale
            J = J.factor
        elif isinstance(J, StackedFactor) and len(J.blocks) == 1:
            J = J.blocks[0]
        else:
            return None


"""Weighted block Grams of an outer-product layer factor (GLM functional variances).

:class:`WeightedBlockGrams` is the part of :class:`~curvkit.linalg.outer.OuterProductFactor` that
forms ``Uᵀ diag(vec_r w) U``'s diagonal ``R × R`` blocks for the Kronecker (in its eigenbasis) and
diagonal posteriors' functional variances ``Jᵀ Σ J`` (Benzing 2022, App. C.1); the index letters
are those of :mod:`curvkit.linalg.outer`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.linalg.lowrank import CHUNK_BYTES
from curvkit.linalg.memory import check_memory

__all__ = ["WeightedBlockGrams"]


class WeightedBlockGrams:
    """Mixin: needs ``a (N, T, d_in)``, ``e (N·R, T, d_out)``, ``N, R, T, d_in, d_out, device``."""

    a: Tensor
    e: Tensor
    N: int
    R: int
    T: int
    d_in: int
    d_out: int
    device: torch.device

    def quad_routes_flops(self) -> dict[str, float]:
        """Flops per input of the two routes of :meth:`weighted_block_grams64` (``R = self.R``).

        ``"pairs"``: ``Σ_d a_{td} a_{t'd} w_{od}`` for every location pair, then two contractions
        with ``e``: ``T²·d_in·d_out + T²·d_in + R·T²·d_out + R²·T·d_out``. ``"per_sample"``: the
        ``R`` per-column gradients, then their weighted Gram: ``R·T·d_in·d_out + R²·d_in·d_out``.
        For ``T = 1`` the pair route is ``d_in·d_out + R²·d_out`` and always the cheaper one.
        """
        T, R, d, o = self.T, self.R, self.d_in, self.d_out
        return {"pairs": float(T * T * d * o + T * T * d + R * T * T * o + R * R * T * o),
                "per_sample": float(R * T * d * o + R * R * d * o)}

    def quad_route(self) -> str:
        """The route of :meth:`weighted_block_grams64` with fewer flops.

        The rule is stated in :meth:`quad_routes_flops`; ``T = 1`` is always ``"pairs"``.
        """
        if self.T == 1:
            return "pairs"
        f = self.quad_routes_flops()
        return "pairs" if f["pairs"] <= f["per_sample"] else "per_sample"

    def quad_bytes_per_input(self, route: str | None = None) -> int:
        """float64 working bytes per input of :meth:`weighted_block_grams64` on ``route``."""
        T, R, d, o = self.T, self.R, self.d_in, self.d_out
        route = route or self.quad_route()
        base = T * d + R * T * o
        if route == "pairs":
            work = (T * T * (d + o) + 2 * R * T * o) if T > 1 else (d + o + R * o)
        else:
            work = 2 * R * o * d
        return 8 * (2 * base + work + R * R)

    def weighted_block_grams64(self, w: Tensor, route: str | None = None) -> Tensor:
        """Diagonal ``R × R`` blocks of ``Uᵀ diag(vec_r w) U`` for a weight grid ``w (d_out, d_in)``.

        Block ``n`` is ``Q_n[r, r'] = Σ_{o,d} w_{od} G_{nr,od} G_{nr',od}`` with the per-column
        gradient ``G_{nr} = Σ_t e_{nrt} a_{nt}ᵀ``, formed without the ``P × M`` matrix::

            T = 1:  Q_n[r, r'] = Σ_o e_{nro} e_{nr'o} W_{no},  W = (a ⊙ a) wᵀ  ((N × d_in)(d_in × d_out))
            T > 1:  Q_n[r, r'] = Σ_{t,t',o} e_{nrto} e_{nr't'o} W_{ntt'o},
                    W_{ntt'o} = Σ_d a_{ntd} a_{nt'd} w_{od}
                    ("pairs"), or the per-column gradients and their weighted Gram ("per_sample");
                    the route with fewer flops is used (:meth:`quad_route`).

        Computed in float64, chunked over inputs so that the working memory stays within
        ``CHUNK_BYTES`` (one input that needs more is memory-checked, GB stated). Used by the
        Kronecker (in its eigenbasis) and diagonal operators for GLM functional variances.

        Args:
            w: ``(d_out, d_in)`` weights (e.g. ``1 / (s_B s_Aᵀ + δ)``), any float dtype.
            route: ``"pairs"``, ``"per_sample"`` or ``None`` (the cheaper).

        Returns:
            ``(N, R, R)`` float64.

        Raises:
            ValueError: ``w`` has the wrong shape or ``route`` is unknown.
            MemoryError: one input's working memory would not fit.
        """
        if tuple(w.shape) != (self.d_out, self.d_in):
            raise ValueError(f"w must have shape ({self.d_out}, {self.d_in}), got {tuple(w.shape)}")
        route = route or self.quad_route()
        if route not in ("pairs", "per_sample"):
            raise ValueError(f"route must be 'pairs' or 'per_sample', got {route!r}")
        N, R, T, d, o = self.N, self.R, self.T, self.d_in, self.d_out
        per_input = self.quad_bytes_per_input(route)
        check_memory(per_input, f"the functional variance of one input through a {o}×{d} layer "
                     f"(T = {T}, route {route!r})", self.device)
        c = max(1, min(N, CHUNK_BYTES // per_input))
        w = w.to(device=self.device, dtype=torch.float64)
        out = torch.empty(N, R, R, dtype=torch.float64, device=self.device)
        for i in range(0, N, c):
            a = self.a[i:i + c].to(torch.float64)
            e = self.e[i * R:(i + c) * R].to(torch.float64)
            n = a.shape[0]
            if T == 1:
                W = (a[:, 0, :] ** 2) @ w.T  # (n, o)
                e = e[:, 0, :].reshape(n, R, o)
                out[i:i + n] = torch.bmm(e * W[:, None, :], e.transpose(1, 2))
            elif route == "pairs":
                pairs = (a[:, :, None, :] * a[:, None, :, :]).reshape(n, T * T, d) @ w.T
                e = e.reshape(n, R, T, o)
                X = torch.einsum("nrto,ntso->nrso", e, pairs.reshape(n, T, T, o))
                out[i:i + n] = torch.bmm(X.reshape(n, R, T * o), e.reshape(n, R, T * o).transpose(1, 2))
            else:
                g = torch.einsum("nrto,ntd->nrod", e.reshape(n, R, T, o), a).reshape(n, R, o * d)
                out[i:i + n] = torch.bmm(g * w.reshape(1, 1, -1), g.transpose(1, 2))
        return out

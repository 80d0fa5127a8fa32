"""The map between parameter space and layer space of a :class:`~curvkit.curvature.Curvature`.

Parameter space: the parameters flattened row-major and concatenated in ``params`` order.
Layer space: layer ``l`` occupies ``vec_r(W̃_l)`` with ``W̃_l = [W_l | b_l]``, layers in model
order. ``index`` maps the two: ``layer_vector = flat_vector[index]``.

Layers whose blocks are flat slices (convolutions without bias, norm layers, ...) make ``index`` a
permutation of a few long **runs**; moving those slices copies memory at copy speed, where a
``P``-sized gather or scatter is several times slower (11M entries: 36 ms against 100 ms on one
core). A list of per-parameter tensors then goes to layer space in one concatenation of slices of
its tensors, and comes back as views of the layer-space result (no copy), where the flat route
makes three ``P``-sized copies. Fragmented layouts (``[W | b]`` rows of narrow layers, fewer than
256 entries per run on average) keep the gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
from torch import Tensor

from curvkit.linalg.memory import scratch

__all__ = ["LayerPermutation"]

#: Minimum mean run length for the slice route (else the gather).
MIN_RUN = 256


class LayerPermutation:
    """Parameter-space ↔ layer-space permutation given by ``index`` (``None``: the identity).

    Args:
        index: flat positions of the layer-space entries; or, per layer in layer order, its flat
            ``(start, stop)`` slice or its positions (then no ``P``-sized index is built unless
            :attr:`index` is read); or ``None`` for the identity.
        shapes: the parameters' shapes (parameter-space order).
        device: where ``index`` lives.
    """

    def __init__(self, index: Tensor | Sequence[Tensor | tuple[int, int]] | None,
                 shapes: Sequence[torch.Size], device: torch.device) -> None:
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [s.numel() for s in self.shapes]
        self.size = sum(self.numels)
        self.device = device
        self.identity = index is None
        if index is None or isinstance(index, Tensor):
            self._parts: list[Tensor | tuple[int, int]] = [] if index is None else [index]
        else:
            self._parts = list(index)

    @cached_property
    def index(self) -> Tensor:
        """Flat positions of the layer-space entries: ``layer_vector = flat_vector[index]``."""
        if self.identity:
            return torch.arange(self.size, device=self.device)
        return torch.cat([torch.arange(*p) if isinstance(p, tuple) else p
                          for p in self._parts]).to(self.device)

    @cached_property
    def inverse_index(self) -> Tensor:
        """Layer-space position of every flat entry: ``flat_vector = layer_vector[inverse]``."""
        inv = torch.empty_like(self.index)
        inv[self.index] = torch.arange(self.index.shape[0], device=self.device)
        return inv

    @cached_property
    def runs(self) -> list[tuple[int, int, int]] | None:
        """``(flat_start, layer_start, length)`` of the layout's runs in layer order, or ``None``.

        ``None`` for the identity and for fragmented layouts (mean run < :data:`MIN_RUN`).
        """
        if self.identity:
            return None
        limit = max(32, self.size // MIN_RUN)
        runs: list[tuple[int, int, int]] = []
        pos = 0
        for part in self._parts:
            if isinstance(part, tuple):
                part_runs, length = [(part[0], pos, part[1] - part[0])], part[1] - part[0]
            else:
                idx = part.reshape(-1).cpu()
                length = idx.shape[0]
                if length == 0:
                    continue
                breaks = (torch.nonzero(idx[1:] - idx[:-1] != 1).reshape(-1) + 1).tolist()
                if len(runs) + len(breaks) + 1 > limit:  # fragmented: stop early
                    return None
                starts, stops = [0, *breaks], [*breaks, idx.shape[0]]
                part_runs = [(f, pos + s, e - s)
                             for f, s, e in zip(idx[starts].tolist(), starts, stops)]
            for f, s, n in part_runs:  # merge a run that continues the previous one
                if runs and runs[-1][0] + runs[-1][2] == f and runs[-1][1] + runs[-1][2] == s:
                    runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + n)
                elif n:
                    runs.append((f, s, n))
            pos += length
        return runs if len(runs) <= limit else None

    @cached_property
    def _offsets(self) -> list[int]:
        """Flat offset of each parameter."""
        offs, pos = [], 0
        for n in self.numels:
            offs.append(pos)
            pos += n
        return offs

    @cached_property
    def _runs_in_flat_order(self) -> list[tuple[int, int, int]]:
        assert self.runs is not None
        return sorted(self.runs)

    def _split(self, start: int, length: int):
        """``(param, offset in param, stop in param)`` pieces of the flat range, in order."""
        stop = start + length
        for i, (o, n) in enumerate(zip(self._offsets, self.numels)):
            a, b = max(start, o), min(stop, o + n)
            if a < b:
                yield i, a - o, b - o

    @cached_property
    def _pieces(self) -> list[tuple[int, int, int]]:
        """Slices of the flattened parameters that make up layer space, in layer order."""
        assert self.runs is not None
        return [p for f, _, n in self.runs for p in self._split(f, n)]

    @cached_property
    def _segments(self) -> list[list[tuple[int, int]]]:
        """Per parameter, its layer-space ranges in the parameter's own (flat) order."""
        assert self.runs is not None
        segs: list[list[tuple[int, int]]] = [[] for _ in self.shapes]
        for f, s, n in self._runs_in_flat_order:
            for i, a, b in self._split(f, n):
                lo = s + (self._offsets[i] + a - f)
                segs[i].append((lo, lo + b - a))
        return segs

    # ------------------------------------------------------------------ (P, k) matrices
    def to_layer(self, X: Tensor) -> Tensor:
        """Flat parameter-space ``(P, k)`` -> layer-space ``(P, k)``."""
        if self.identity:
            return X
        if self.runs is not None:
            return torch.cat([X[f:f + n] for f, _, n in self.runs])
        return X[self.index]

    def from_layer(self, Y: Tensor) -> Tensor:
        """Layer-space ``(P, k)`` -> flat parameter-space ``(P, k)``."""
        if self.identity:
            return Y
        if self.runs is not None:  # the runs in flat order; together they cover every entry once
            return torch.cat([Y[s:s + n] for _, s, n in self._runs_in_flat_order])
        inv = self.inverse_index  # out[index] = Y, as a gather (faster than the scatter)
        if Y.dim() == 2 and Y.shape[1] > 1 and Y.stride(0) == 1:  # column-major: gather columns of Yᵀ
            return Y.T.index_select(1, inv).T
        return Y.index_select(0, inv)

    # ------------------------------------------------------------------ lists of tensors
    @property
    def direct_lists(self) -> bool:
        """Whether lists go to and from layer space directly (the slice route of a permutation)."""
        return self.runs is not None

    def list_to_layer(self, v: Sequence[Tensor], reuse: bool = False) -> Tensor:
        """Per-parameter tensors -> layer-space ``(P, 1)`` in one concatenation (needs runs).

        ``reuse=True`` writes into one ``P``-sized buffer per thread kept between calls
        (:func:`curvkit.linalg.memory.scratch`; it holds ``P`` entries of the dtype, e.g. 45 MB for
        11M float32 parameters), so a solve pays no page faults for its input copy. The caller
        must not return that buffer or a view of it (see :meth:`owned`).
        """
        flat = [t.reshape(-1) for t in v]
        pieces = [flat[i][a:b] for i, a, b in self._pieces]
        if reuse and torch.is_grad_enabled() and any(t.requires_grad for t in v):
            reuse = False  # autograd through the concatenation (e.g. F @ v in a penalty)
        if not reuse:
            return torch.cat(pieces).unsqueeze(1)
        buf = scratch("permutation.in", (self.size,), v[0].dtype, v[0].device, limit=self.size)
        return torch.cat(pieces, out=buf).unsqueeze(1)

    @staticmethod
    def owned(Y: Tensor, X: Tensor) -> Tensor:
        """``Y``, copied if it shares memory with the reused input buffer ``X``."""
        same = Y.untyped_storage().data_ptr() == X.untyped_storage().data_ptr()
        return Y.clone() if same else Y

    def layer_to_list(self, Y: Tensor) -> list[Tensor]:
        """Layer-space ``(P, 1)`` -> per-parameter tensors, views of ``Y`` where contiguous."""
        col = Y[:, 0]
        out = []
        for shape, segs in zip(self.shapes, self._segments):
            if len(segs) == 1:
                out.append(col[segs[0][0]:segs[0][1]].view(shape))
            else:
                out.append(torch.cat([col[a:b] for a, b in segs]).view(shape))
        return out

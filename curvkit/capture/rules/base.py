"""The contract of a layer rule: how one module's parameters become columns of the factor ``G``.

``F = G Gᵀ`` (see :mod:`curvkit.capture.targets` for the scaling). A rule maps what forward
hooks see of one layer -- its input ``x`` and the gradient ``∂⟨seed, f⟩/∂s`` w.r.t. its output
``s`` -- to a pair ``(a, e)``:

* ``a`` of shape ``(N, T, d_in)`` from the inputs (one row per input ``n`` and location ``t``);
* ``e`` of shape ``(M, T, d_out)`` from the output gradients (``M = N·R`` columns, input-major),

such that column ``m = n·R + r`` of ``G`` restricted to the layer is ``vec_r(Σ_t e_{mt} a_{nt}ᵀ)``
(a ``d_out × d_in`` matrix read row-major). This is the Kronecker form: KFAC's factors are
``Â = (1/N) Σ a aᵀ`` and ``B̂ = (1/T) Σ e eᵀ``, and the Woodbury Gram, products and diagonal come
from ``(a, e)`` without per-sample gradients (:class:`~curvkit.linalg.OuterProductFactor`).

A layer without a Kronecker form (norm layers, the generic route) gives its per-sample gradients
in *explicit* form instead: :meth:`LayerAdapter.combine` returns ``a = 1`` of shape ``(N, 1, 1)``
and ``e`` of shape ``(M, 1, P_l)``, the per-column gradients themselves -- the same contract with
``T = d_in = 1`` (its KFAC block ``B̂ ⊗ [1]`` is then the exact block ``G_l G_lᵀ``).

:meth:`LayerAdapter.layer_index` says where the ``d_out × d_in`` entries live in the flat
parameter vector, so a rule may read a parameter in any layout (transposed, per group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor, nn
from typing_extensions import override

from curvkit.linalg import LowRankFactor, OuterProductFactor


class UnsupportedLayerError(TypeError):
    """A trainable parameter lives in a module curvkit cannot capture the requested way."""


class BatchLayoutError(ValueError):
    """A layer input has no dimension that can be identified as the batch dimension."""


@dataclass(eq=False)
class LayerAdapter:
    """One captured layer (or one block of it) and which of its parameters are selected.

    The default implementation is the rule of ``nn.Linear``: ``W̃ = [W | b]`` acting on the
    input rows of ``(N, *, d)`` inputs (``T`` = product of the middle dimensions).

    Attributes:
        name: qualified module name in the model (``""`` for the model itself).
        module: the module whose forward hook records the layer.
        weight: whether ``module.weight`` is among the selected parameters.
        bias: whether ``module.bias`` is among the selected parameters.
        kronecker: class flag; ``(a, e)`` is a Kronecker form (KFAC/FOOF factors are meaningful).
        standard: class flag; the layer block is ``[W.reshape(d_out, -1) | b]`` of the whole
            module (the layout the optimizers precondition in).
        hooked: class flag; captured by forward hooks (``False``: the generic route).
        family: short rule name used in messages.
        tied: further modules of the same type holding the same parameters (their calls are
            extra uses of this layer), with their names in ``tied_names``.
    """

    name: str
    module: nn.Module
    weight: bool
    bias: bool
    tied: tuple[nn.Module, ...] = ()
    tied_names: tuple[str, ...] = ()

    kronecker: ClassVar[bool] = True
    standard: ClassVar[bool] = True
    hooked: ClassVar[bool] = True
    family: ClassVar[str] = "linear"
    #: Parameter names (own parameters of the module) this rule captures; others go generic.
    handles: ClassVar[tuple[str, ...]] = ("weight", "bias")
    #: ``a`` holds one-hot indices ``(N, T, 1)`` instead of dense inputs (embeddings); read it
    #: through :meth:`project_inputs`, :meth:`input_norms` and :meth:`factor`.
    one_hot: ClassVar[bool] = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, name: str, module: nn.Module, selected: set[str]) -> list[LayerAdapter]:
        """The adapters of ``module`` for its selected own parameter names ``selected``.

        Override to split a layer into blocks (e.g. one per convolution group).
        """
        ad = cls(name, module, "weight" in selected, "bias" in selected)
        ad.check()
        return [ad]

    # ------------------------------------------------------------------ shapes
    @property
    def row0(self) -> int:
        """First row of ``W.reshape(rows, -1)`` this block covers (per-group blocks)."""
        return 0

    @property
    def d_out(self) -> int:
        """``d_out``: rows of the block ``W̃`` (the weight's first dimension)."""
        return int(cast(Tensor, self.module.weight).shape[0])

    @property
    def d_w(self) -> int:
        """Number of weight columns (``d_in`` without the bias column)."""
        return int(math.prod(cast(Tensor, self.module.weight).shape[1:]))

    @property
    def d_in(self) -> int:
        """Columns of ``W̃``: weight columns if selected, plus one if the bias is selected."""
        return (self.d_w if self.weight else 0) + (1 if self.bias else 0)

    @property
    def size(self) -> int:
        """Number of parameters of the block, ``d_out · d_in``."""
        return self.d_out * self.d_in

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """Every module whose calls are uses of this layer."""
        return (self.module, *self.tied)

    def describe(self) -> str:
        """The layer for messages: its name, module type and tied modules."""
        tied = f", tied with {', '.join(repr(n) for n in self.tied_names)}" if self.tied else ""
        return f"'{self.name or '<model>'}' ({type(self.module).__name__}{tied})"

    def batch_first(self, x: Tensor, batch_size: int | None, what: str,
                    movable: bool = False) -> Tensor:
        """Move the batch dimension of a layer input/output gradient to the front.

        Dimension 0 is the batch dimension when its size is ``batch_size`` (or ``batch_size`` is
        None); with ``movable`` (Linear) exactly one other non-feature dimension of that size is
        moved to the front; otherwise :class:`BatchLayoutError`.
        """
        if batch_size is None or x.dim() < 2 or x.shape[0] == batch_size:
            return x
        if movable:
            dims = [k for k in range(1, x.dim() - 1) if x.shape[k] == batch_size]
            if len(dims) == 1:
                return x.movedim(dims[0], 0)
        raise BatchLayoutError(
            f"Layer {self.describe()} got a {what} of shape {tuple(x.shape)} in which the batch "
            f"size N = {batch_size} is not dimension 0"
            + (" nor exactly one other dimension" if movable else "")
            + "; curvkit needs per-sample layer inputs. Feed the layer batch-first inputs "
            "(e.g. batch_first=True), or freeze its parameters."
        )

    def parameters(self) -> list[nn.Parameter]:
        """The selected parameters of this block (whole tensors)."""
        out: list[nn.Parameter] = []
        if self.weight:
            out.append(cast(nn.Parameter, self.module.weight))
        if self.bias:
            out.append(cast(nn.Parameter, self.module.bias))
        return out

    # ------------------------------------------------------------------ capture
    def inputs(self, x: Tensor, module: nn.Module | None = None,
               batch_size: int | None = None) -> Tensor:
        """Layer input -> ``a`` of shape ``(N, T, d_in)`` (with a ones column for a bias).

        Args:
            x: the input of one call.
            module: the module that was called (one of :attr:`modules`; default the first).
            batch_size: ``N``, to locate the batch dimension (default: dimension 0).
        """
        x = x.detach()
        if x.dim() > 1:
            x = self.batch_first(x, batch_size, "input", movable=True)
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        else:
            a = x.reshape(1, 1, -1)
        return self.with_bias_column(a)

    def per_sample_output(self, x: Tensor, output: Tensor, batch_size: int | None) -> Tensor:
        """The output the capture records and the model continues with (default: ``output``).

        A rule may expand an output shared by the whole batch (a lookup broadcast over it) to
        ``N`` rows, so that its output gradients are per sample.
        """
        return output

    def with_bias_column(self, a: Tensor) -> Tensor:
        """``a`` restricted to the selected columns: weight columns and/or a ones column."""
        cols = [a] if self.weight else []
        if self.bias:
            cols.append(torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device))
        return torch.cat(cols, dim=2) if len(cols) > 1 else cols[0]

    def errors(self, grad_out: Tensor, batch_size: int | None = None) -> Tensor:
        """Gradient w.r.t. the layer output -> ``e`` of shape ``(N, T, d_out)``.

        ``batch_size`` locates the batch dimension as in :meth:`inputs`.
        """
        if grad_out.dim() < 2:
            return grad_out.reshape(1, 1, -1)
        grad_out = self.batch_first(grad_out, batch_size, "output gradient", movable=True)
        return grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])

    def block_gradient(self, grads: dict[int, Tensor]) -> Tensor:
        """The block ``(d_out, d_in)`` of a gradient given per parameter (``id -> tensor``)."""
        offsets, off, flat = {}, 0, []
        for p in self.parameters():
            offsets[id(p)] = off
            off += p.numel()
            g = grads[id(p)]
            flat.append((g.to_dense() if g.is_sparse else g).reshape(-1))  # Embedding(sparse=True)
        v = torch.cat(flat) if len(flat) > 1 else flat[0]
        span = self.span(offsets)
        if span is not None:  # the block is the flat vector in order: no index
            return v[span[0]:span[1]].reshape(self.d_out, self.d_in)
        return v[self.layer_index(offsets).to(v.device)].reshape(self.d_out, self.d_in)

    def combine(self, a: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """Final ``(a, e)`` from the recorded pair (explicit rules form per-sample gradients)."""
        return a, e

    def factor(self, a: Tensor, e: Tensor) -> LowRankFactor:
        """The layer's block ``U_l`` of ``G`` (Gram, products, squared row norms)."""
        return OuterProductFactor(a, e)

    def project_inputs(self, a: Tensor, Q: Tensor) -> Tensor:
        """``a_{nt}ᵀ Q`` per location, ``(N·T, K)`` for ``Q`` of shape ``(d_in, K)``."""
        return a.reshape(-1, a.shape[-1]).to(Q.dtype) @ Q

    def input_norms(self, a: Tensor, dtype: torch.dtype) -> Tensor:
        """``‖a_{nt}‖`` per location, ``(N, T)``."""
        return torch.linalg.vector_norm(a.to(dtype), dim=-1)

    def check(self) -> None:
        """Raise :class:`UnsupportedLayerError` for configurations the rule cannot represent."""

    # ------------------------------------------------------------------ layout
    def layer_index(self, offsets: dict[int, int]) -> Tensor:
        """Flat-vector positions of the block's ``d_out × d_in`` entries, row-major.

        Args:
            offsets: ``id(param) -> offset`` of each selected parameter in the flat vector.
        """
        m = self.module
        rows = self.row0 + torch.arange(self.d_out)
        idx = []
        if self.weight:
            idx.append(offsets[id(m.weight)] + rows[:, None] * self.d_w + torch.arange(self.d_w))
        if self.bias:
            idx.append(offsets[id(m.bias)] + rows[:, None])
        return torch.cat(idx, dim=1).reshape(-1)

    def span(self, offsets: dict[int, int]) -> tuple[int, int] | None:
        """``(start, stop)`` if the block is the flat slice ``[start, stop)`` in order, else None."""
        m = self.module
        w0 = offsets[id(m.weight)] + self.row0 * self.d_w if self.weight else None
        b0 = offsets[id(m.bias)] + self.row0 if self.bias else None
        if w0 is not None and b0 is None:
            return w0, w0 + self.size
        if b0 is not None and w0 is None:
            return b0, b0 + self.size
        if self.d_out == 1 and w0 is not None and b0 == w0 + self.d_w:
            return w0, w0 + self.size
        return None


class TransposedWeightAdapter(LayerAdapter):
    """A linear layer whose weight is stored as ``(d_in, d_out)``: the block is ``[Wᵀ | b]``.

    Hugging Face ``Conv1D`` (``y = x W + b``) and ``nn.Embedding`` (``W̃ = Wᵀ`` on one-hot inputs)
    share this layout: ``d_out`` is the stored weight's second dimension, ``d_w`` its first, and
    entry ``(o, i)`` of the block reads ``W[i, o]`` (flat position ``i·d_out + o``).
    """

    @override
    @property
    def d_out(self) -> int:
        """The second dimension of the stored weight."""
        return int(cast(Tensor, self.module.weight).shape[1])

    @override
    @property
    def d_w(self) -> int:
        """The first dimension of the stored weight."""
        return int(cast(Tensor, self.module.weight).shape[0])

    @override
    def layer_index(self, offsets: dict[int, int]) -> Tensor:
        """Flat positions of ``[Wᵀ | b]`` row-major (entry ``(o, i)`` is ``W[i, o]``)."""
        m = self.module
        rows = torch.arange(self.d_out)[:, None]
        idx = []
        if self.weight:
            idx.append(offsets[id(m.weight)] + torch.arange(self.d_w)[None, :] * self.d_out + rows)
        if self.bias:
            idx.append(offsets[id(m.bias)] + rows)
        return torch.cat(idx, dim=1).reshape(-1)

    @override
    def span(self, offsets: dict[int, int]) -> tuple[int, int] | None:
        """A contiguous slice only for the bias alone or a weight with one row or column."""
        m = self.module
        if self.bias and not self.weight:
            b0 = offsets[id(m.bias)]
            return b0, b0 + self.size
        if self.weight and not self.bias and (self.d_out == 1 or self.d_w == 1):
            w0 = offsets[id(m.weight)]
            return w0, w0 + self.size
        return None


class ExplicitAdapter(LayerAdapter):
    """Base of rules that give per-sample gradients in explicit form (``T = d_in = 1``).

    Subclasses implement :meth:`per_sample` (``(N, T, ·)`` recorded inputs and ``(M, T, ·)``
    errors -> ``(M, P_l)`` gradients in :meth:`parameters` order, each flattened row-major).
    """

    kronecker: ClassVar[bool] = False
    standard: ClassVar[bool] = False
    family: ClassVar[str] = "explicit"

    @override
    @property
    def d_out(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @override
    @property
    def d_w(self) -> int:
        return 1

    @override
    @property
    def d_in(self) -> int:
        return 1

    def per_sample(self, a: Tensor, e: Tensor) -> Tensor:
        """``(M, size)`` explicit per-column gradients from ``a`` and ``e`` (the rule's formula)."""
        raise NotImplementedError

    @override
    def combine(self, a: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        N = a.shape[0]
        g = self.per_sample(a, e)
        return torch.ones(N, 1, 1, dtype=g.dtype, device=g.device), g.unsqueeze(1)

    @override
    def layer_index(self, offsets: dict[int, int]) -> Tensor:
        return torch.cat([offsets[id(p)] + torch.arange(p.numel()) for p in self.parameters()])

    @override
    def span(self, offsets: dict[int, int]) -> tuple[int, int] | None:
        start = pos = None
        for p in self.parameters():
            o = offsets[id(p)]
            if start is None:
                start = pos = o
            elif o != pos:
                return None
            pos += p.numel()
        if start is None or pos is None:  # no parameters selected
            return None
        return start, pos

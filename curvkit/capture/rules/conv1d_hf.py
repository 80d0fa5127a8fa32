"""Rule for Hugging Face's ``Conv1D`` (GPT-2's projections): a Linear layer with ``Wᵀ`` stored.

``transformers.pytorch_utils.Conv1D(nf, nx)`` computes ``y = x W + b`` with ``W`` of shape
``(nx, nf)`` (``addmm`` on the rows of ``(N, *, nx)`` inputs). It is ``nn.Linear`` with the weight
stored transposed, so the Kronecker form is Linear's: ``a_{nt} = [x_{nt}, 1]`` (``d_in = nx``
plus the bias column), ``e_{mt} = ∂⟨seed_m, f⟩/∂y_{nt}`` (``d_out = nf``), and the block
``W̃ = [Wᵀ | b]`` is read through a transposed :meth:`layer_index` (entry ``(o, i)`` of the
block is ``W[i, o]``).

``transformers`` is not a dependency of curvkit: the rule is bound to the class by its qualified
name (:data:`QUALNAME`) and applies only to that exact class (and subclasses keeping its
``forward``); the capture guard checks every capture against autograd.
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
from torch import Tensor

from curvkit.capture.rules.base import LayerAdapter

#: ``module.qualname`` of the Hugging Face class this rule is bound to.
QUALNAME = "transformers.pytorch_utils.Conv1D"


class HFConv1DAdapter(LayerAdapter):
    """``transformers`` ``Conv1D``: Linear with the weight stored as ``(d_in, d_out)``."""

    standard: ClassVar[bool] = False  # the optimizers precondition [W.reshape(d_out, -1) | b]
    family: ClassVar[str] = "hf_conv1d"

    @property
    def d_out(self) -> int:
        """``nf``: the second dimension of the stored weight."""
        return int(cast(Tensor, self.module.weight).shape[1])

    @property
    def d_w(self) -> int:
        """``nx``: the first dimension of the stored weight."""
        return int(cast(Tensor, self.module.weight).shape[0])

    def layer_index(self, offsets: dict[int, int]) -> Tensor:
        """Flat positions of ``[Wᵀ | b]`` row-major (entry ``(o, i)`` is ``W[i, o]``)."""
        m = self.module
        rows = torch.arange(self.d_out)[:, None]
        idx = []
        if self.weight:  # block entry (o, i) is W[i, o], flat position i·d_out + o
            idx.append(offsets[id(m.weight)] + torch.arange(self.d_w)[None, :] * self.d_out + rows)
        if self.bias:
            idx.append(offsets[id(m.bias)] + rows)
        return torch.cat(idx, dim=1).reshape(-1)

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

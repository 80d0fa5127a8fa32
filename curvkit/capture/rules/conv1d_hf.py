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

from typing import ClassVar

from curvkit.capture.rules.base import TransposedWeightAdapter

#: ``module.qualname`` of the Hugging Face class this rule is bound to.
QUALNAME = "transformers.pytorch_utils.Conv1D"


class HFConv1DAdapter(TransposedWeightAdapter):
    """``transformers`` ``Conv1D``: Linear with the weight stored as ``(d_in, d_out)`` (``nx, nf``)."""

    standard: ClassVar[bool] = False  # the optimizers precondition [W.reshape(d_out, -1) | b]
    family: ClassVar[str] = "hf_conv1d"

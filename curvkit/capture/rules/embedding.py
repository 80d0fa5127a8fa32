"""Rule for ``nn.Embedding``: a linear layer on one-hot inputs, kept as indices.

``y_{nt} = W[i_{nt}]`` with ``W`` of shape ``(V, d)`` is ``W̃ a_{nt}`` with ``W̃ = Wᵀ`` (``d_out =
d`` rows, ``d_in = V`` columns) and ``a_{nt} = 1_{i_{nt}}`` the one-hot of the index, so the
Kronecker form is Linear's with ``e_{mt} = ∂⟨seed_m, f⟩/∂y_{nt}``. The one-hots are never formed:
``a`` holds the indices ``(N, T, 1)`` (``int64``) and :class:`~curvkit.linalg.onehot.OneHotFactor`
gives the Woodbury Gram (index equality), products (``index_select`` / ``index_add``) and the
diagonal from them; KFAC's input factor is ``Â = (1/N) diag(counts)``, the index counts
(:func:`curvkit.curvature.kfac.input_factor_of`). The Fisher type and scaling are those of the
capture (:mod:`curvkit.capture.targets`).

* ``padding_idx``: locations holding it get index ``−1`` (no row; autograd gives that row a zero
  gradient);
* ``sparse=True``: only the gradient's storage differs; the rule and the guard (which densifies
  autograd's sparse gradient) are unchanged;
* ``max_norm``: refused -- the forward renormalises rows of ``W`` in place, so the parameters
  differ from those the curvature would be taken at;
* an Embedding tied to a module of another type (GPT-2's ``wte``/``lm_head``) takes the generic
  route (:mod:`curvkit.capture.layers`).

The optimizers do not precondition embeddings (``standard = False``: ``W̃ = Wᵀ`` is not the
``[W | b]`` layout they use).
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from curvkit.capture.rules.base import TransposedWeightAdapter, UnsupportedLayerError
from curvkit.linalg import LowRankFactor
from curvkit.linalg.onehot import OneHotFactor


class EmbeddingAdapter(TransposedWeightAdapter):
    """``nn.Embedding``: ``W̃ = Wᵀ`` (``d_out = d``, ``d_w = V``) on one-hot inputs given by their indices."""

    standard: ClassVar[bool] = False
    family: ClassVar[str] = "embedding"
    handles: ClassVar[tuple[str, ...]] = ("weight",)
    #: ``a`` holds indices ``(N, T, 1)``, not dense inputs (:meth:`project_inputs`).
    one_hot: ClassVar[bool] = True

    def check(self) -> None:
        """Refuse ``max_norm`` (the forward changes the weight in place)."""
        m = cast(nn.Embedding, self.module)
        if m.max_norm is not None:
            raise UnsupportedLayerError(
                f"Layer {self.describe()} has max_norm={m.max_norm}: its forward renormalises rows "
                "of the weight in place, so the curvature would be taken at parameters that change "
                "during the capture. Set max_norm=None (renormalise explicitly between steps) or "
                "freeze its weight (requires_grad_(False)).")

    @staticmethod
    def _broadcast(x: Tensor, batch_size: int | None) -> bool:
        return batch_size is not None and batch_size > 1 and x.dim() >= 1 and x.shape[0] == 1

    def per_sample_output(self, x: Tensor, output: Tensor, batch_size: int | None) -> Tensor:
        """A lookup of ``(1, T)`` indices shared by the batch (GPT-2's positions) -> ``(N, T, d)``.

        The model then continues with the expanded output (equal values; broadcasting it against
        ``(N, T, d)`` tensors gives the same result), and its gradients are per sample.
        """
        if self._broadcast(x, batch_size):
            return output.expand(int(batch_size or 1), *output.shape[1:])
        return output

    def inputs(self, x: Tensor, module: nn.Module | None = None,
               batch_size: int | None = None) -> Tensor:
        """Indices ``(N, *)`` -> ``a`` of shape ``(N, T, 1)`` (``int64``; ``−1`` at padding_idx).

        Indices ``(1, *)`` shared by a batch of ``N > 1`` are expanded to every sample
        (:meth:`per_sample_output`).
        """
        idx = x.detach().long()
        if idx.dim() == 0:
            idx = idx.reshape(1, 1)
        if self._broadcast(idx, batch_size):
            idx = idx.expand(int(batch_size or 1), *idx.shape[1:])
        idx = self.batch_first(idx.unsqueeze(-1), batch_size, "input", movable=True)
        idx = idx.reshape(idx.shape[0], -1, 1)
        pad = cast(nn.Embedding, module or self.module).padding_idx
        return idx.masked_fill(idx == pad, -1) if pad is not None else idx

    def factor(self, a: Tensor, e: Tensor) -> LowRankFactor:
        """:class:`~curvkit.linalg.onehot.OneHotFactor` of the indices and errors."""
        return OneHotFactor(a[..., 0], e, self.d_w)

    def project_inputs(self, a: Tensor, Q: Tensor) -> Tensor:
        """``a_{nt}ᵀ Q`` per location, ``(N·T, K)``: the rows ``Q[i_{nt}]`` (zero at padding)."""
        idx = a.reshape(-1)
        rows = Q.index_select(0, idx.clamp_min(0))
        return rows * (idx >= 0).to(Q.dtype)[:, None]

    def input_norms(self, a: Tensor, dtype: torch.dtype) -> Tensor:
        """``‖a_{nt}‖``, ``(N, T)``: 1, or 0 at padding."""
        return (a[..., 0] >= 0).to(dtype)

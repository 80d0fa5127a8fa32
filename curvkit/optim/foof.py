"""FOOF, the "Fast First-Order Optimizer": gradient descent on neurons (paper eqs 5–6, Alg. 1)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from curvkit.curvature.kfac import input_factor
from curvkit.linalg import Kronecker
from curvkit.linalg.kronecker import KroneckerInverse
from curvkit.optim.factored import FactoredOptimizer


class FOOF(FactoredOptimizer):
    """FOOF (Benzing 2022, Algorithm 1): precondition each layer's gradient by its input factor.

    Symbols: ``η`` = ``lr``, ``λ`` = ``damping``, ``m`` = ``ema_decay``, ``T`` = ``inv_period``,
    ``S`` = ``ema_steps``, ``μ`` = ``momentum``, ``ω`` = ``weight_decay``. Per layer with inputs
    ``a_{nt}`` (``N`` batch entries, ``T`` locations: 1 for a dense layer, the unfolded patches of
    a convolution; with a ones entry for a bias)::

        Â_t  = (1/N) Σ_n Σ_t a_{nt} a_{nt}ᵀ                    (batch-mean input factor)
        Σ̄    ← m Σ̄ + (1 − m) Â_t,   w ← m w + (1 − m)           (statistics steps)
        P    ← (Σ̄/w + λ I)⁻¹                                    (inversion steps)
        m_t  ← μ m_{t−1} + ∇_W L                                (raw gradient of the user's loss)
        W    ← W − η ω W − η m_t P                              (right multiplication, d_in × d_in)

    With ``ema_decay=0, inv_period=1`` the first step is exactly ``ΔW = −η ∇_W L (Â_0 + λI)⁻¹``
    and step ``t ≥ 1`` uses the previous batch's ``Â_{t−1}`` (``precondition_with="current"``:
    always the current batch's).
    The schedule and the order within a step are documented in :mod:`curvkit.optim.factored`;
    ``step_count``, ``counts`` and :meth:`factors` expose them.

    **Normalisation and the paper's hyperparameters.** ``Â`` is a batch *mean*. The paper's code
    uses the batch *sum* ``AAᵀ = N Â`` for dense layers together with the gradient of the *mean*
    loss, so its ``(η_p, λ_p)`` map to ``η = η_p / N``, ``λ = λ_p / N`` here (the paper's
    recommended FOOF setting ``(30, 100)`` at ``N = 100`` becomes the defaults ``(0.3, 1.0)``;
    the effective SGD step size ``η/λ`` is unchanged). The paper's code already uses a batch mean
    for convolutions, so there ``(η, λ) = (η_p, λ_p)``. For App. F's formulas, which use the
    gradient of the *summed* loss, training on the mean loss gives ``η = η_p``, ``λ = λ_p / N``.

    Args:
        model: the network; all trained parameters must live in ``nn.Linear``/``nn.Conv2d``.
        lr: ``η > 0``.
        damping: ``λ > 0`` (read at inversion steps).
        ema_decay: ``m ∈ [0, 1)``.
        inv_period: ``T ≥ 1``.
        ema_steps: ``S``, ``1 ≤ S ≤ T``; default ``S = T`` (EMA updated every step, the
            paper's choice for fully connected networks, App. K).
        momentum: ``μ ∈ [0, 1)``, heavy ball on the raw gradient before preconditioning.
        weight_decay: ``ω ≥ 0``, decoupled (``W ← W − η ω W``, outside the preconditioner).
        precondition_with: ``"previous"`` (default, Algorithm 1: ``P`` holds only batches before
            the current one; the first step uses the initial factors) or ``"current"`` (the
            batch of a statistics step is folded in before its own update; with
            ``ema_decay=0, inv_period=1`` each step then uses exactly its own batch's ``Â``).
            See :mod:`curvkit.optim.factored`.
        params: parameters or parameter groups (per-group ``lr``, ``damping``, ``momentum``,
            ``weight_decay``); default all trainable parameters of ``model``.

    Data parallel: under ``torch.distributed`` (wrap the model in DDP so gradients are averaged)
    the factor EMAs are averaged across ranks at each inversion, so every rank applies the same
    update, equal to one process on the concatenated batch (equal per-rank batch sizes).

    Besides ``step``: :meth:`direction` (the next step's ``Δθ`` without applying it),
    :meth:`factors` (normalised ``Â`` per layer), :meth:`initialize` (pre-fill the EMA from extra
    batches, App. K), ``counts`` / ``step_count`` (schedule bookkeeping), :meth:`remove_hooks`.
    Evaluate the model under ``torch.no_grad()`` between steps: the latest grad-enabled forward
    before ``step`` provides the statistics.
    """

    factor_names = ("A",)

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.3,
        damping: float = 1.0,
        ema_decay: float = 0.95,
        inv_period: int = 100,
        ema_steps: int | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        precondition_with: str = "previous",
        params: Iterable | None = None,
    ) -> None:
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model, params, defaults, ema_decay=ema_decay, inv_period=inv_period,
                         ema_steps=ema_steps, precondition_with=precondition_with)

    def _batch_factors(self, t: int) -> list[dict[str, Tensor]]:
        out = [{"A": input_factor(a, symmetrize=False)} for a in self._recorded_inputs(t)]
        self._check_finite(out, {"A": "inputs"}, t)
        return out

    def _invert(self, i: int, factors: dict[str, Tensor], damping: float) -> dict[str, Any]:
        """``(Â + λI)⁻¹`` of the operator ``I ⊗ Â``.

        By :meth:`curvkit.linalg.Kronecker.factorize` (``cholesky_inverse``, or the Cholesky
        factor itself when it is applied rarely: ``T = 1``; float32 only where the damped factor
        is well conditioned).
        """
        A = factors["A"]
        K = Kronecker(None, A, d_out=self.layers[i].d_out, name=f"FOOF[{self.layers[i].name}]")
        return K.factorize(damping, "exact", dtype=A.dtype, allow_float32=True,
                           uses=self.schedule.inv_period).state_dict()

    def _precondition(self, i: int, pieces: dict[str, Any], M: Tensor, damping: float) -> Tensor:
        return KroneckerInverse.from_state_dict(pieces).solve_matrix(M)

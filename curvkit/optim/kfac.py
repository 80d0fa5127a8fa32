"""KFAC with heuristic (factored Tikhonov, eq 2) or standard damping (eq 3, App. D.1).

Also the App. D.9 variant "FOOF with λ_A from KFAC" as a trainable direction.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvkit.curvature.kfac import input_factor, output_factor
from curvkit.curvature.streaming import LIKELIHOODS, ErrorRecorder, check_choice
from curvkit.linalg import Kronecker
from curvkit.linalg.kronecker import KroneckerInverse
from curvkit.optim.factored import FactoredOptimizer, Plan, norm_ratio
from curvkit.typing import DampingMode, Kind, Likelihood

#: KFAC's damping modes: the paper's heuristic (factored Tikhonov, eq 2) and the exact ("standard")
#: damping ``(B̂ ⊗ Â + λI)⁻¹`` (eq 3); the name ``"exact"`` is the one every curvkit solve uses.
DAMPING_MODES = ("heuristic", "exact")
#: Deprecated spellings of :data:`DAMPING_MODES` entries.
DAMPING_ALIASES: dict[str, DampingMode] = {"standard": "exact"}
KFAC_KINDS = ("mc", "exact")
VARIANTS = ("kfac", "foof")
RESCALES = (None, "lambda_b", "norm")


def check_variant(variant: str, rescale: str | None) -> None:
    """``ValueError`` unless ``variant`` is in :data:`VARIANTS` and ``rescale`` fits it."""
    check_choice(variant, VARIANTS, "variant")
    if rescale not in RESCALES:
        raise ValueError(f"unknown rescale {rescale!r}; valid: {RESCALES}")
    if variant == "kfac" and rescale is not None:
        raise ValueError("rescale applies to variant='foof' only")


class KFAC(FactoredOptimizer):
    """KFAC as used in the paper (Martens & Grosse 2015; Benzing 2022 eq 2, App. D.1).

    Symbols: ``η`` = ``lr``, ``λ`` = ``damping``, ``m`` = ``ema_decay``, ``T`` = ``inv_period``,
    ``S`` = ``ema_steps``, ``μ`` = ``momentum``, ``ω`` = ``weight_decay``. Per layer, from the
    batch inputs ``a_{nt}`` and the errors ``ê_{nt} = ∂(−log p(ŷ_n|x_n))/∂s_{nt}`` of labels
    ``ŷ_n`` sampled from the model (``kind="mc"``; ``kind="exact"`` sums over all labels weighted
    by their probabilities)::

        Â_t = (1/N) Σ_n Σ_t a_{nt} a_{nt}ᵀ,      B̂_t = (1/(N·T)) Σ_n Σ_t ê_{nt} ê_{nt}ᵀ
        Ā ← m Ā + (1 − m) Â_t,  B̄ ← m B̄ + (1 − m) B̂_t,  w ← m w + (1 − m)   (statistics steps)
        Â = Ā/w, B̂ = B̄/w                                                  (normalised EMA)
        heuristic:  ΔW = −η (B̂ + λ_B I)⁻¹ M (Â + λ_A I)⁻¹,
                    π = sqrt((tr Â/d_in)/(tr B̂/d_out)), λ_A = π√λ, λ_B = √λ/π   (eq 2)
        exact:      ΔW = −η U_B [(U_Bᵀ M U_A) ⊘ (s_B s_Aᵀ + λ)] U_Aᵀ  = −η mat((B̂⊗Â + λI)⁻¹ vec M)

    with ``M = μ M_prev + ∇_W L`` and ``Â = U_A diag(s_A) U_Aᵀ``, ``B̂ = U_B diag(s_B) U_Bᵀ`` (paper
    eq 3 through eigendecompositions, footnote 2; the public code transposes the B-side basis),
    plus the decoupled weight decay ``−η ω W``. ``T`` is the number of locations (1 for a dense
    layer): for convolutions this is the KFC convention (Grosse & Martens 2016), ``B̂ ⊗ Â ≈ Fisher
    block`` under spatial homogeneity. The inverses are held as a factorised
    :class:`curvkit.linalg.Kronecker` inverse (:meth:`~curvkit.linalg.Kronecker.factorize`:
    ``cholesky_inverse`` of the damped factors, or with ``inv_period=1`` their Cholesky factors
    applied by triangular solves, in float32 only where the damped factor is well conditioned;
    eigendecompositions in float64). Heuristic damping is fixed at inversion time;
    standard damping is applied each step with the current ``λ``.

    The sampled-label errors come from an extra backward pass the optimizer arranges itself: a
    forward hook on ``model`` back-propagates the sampled-label seeds ``(p − 1_ŷ)/√N`` from the
    output to the layer outputs right after each forward of a statistics step (with
    ``retain_graph=True``, no parameter gradients touched), so the user's loop is unchanged. The
    model output must be the logits / mean ``(N, C)`` of ``likelihood``. Evaluate the model under
    ``torch.no_grad()`` between steps (the latest grad-enabled forward before ``step`` is used).

    With ``ema_decay=0, inv_period=1`` the first step is exactly the damped KFAC step on its own
    batch, in both damping modes; later steps use the previous batch's factors (Algorithm 1's
    order) or, with ``precondition_with="current"``, their own. Schedule: see
    :mod:`curvkit.optim.factored`.

    **App. D.9 ("FOOF'").** ``variant="foof"`` trains along KFAC without its second factor,
    ``ΔW = −η M (Â + λ_A I)⁻¹`` with KFAC's normalised ``Â`` and π-rule ``λ_A`` (which varies
    during training, unlike FOOF's constant ``λ``); ``rescale="lambda_b"`` multiplies it by
    ``1/λ_B = λ_A/λ`` (the Fig 3 version, keeping KFAC's effective step size) and
    ``rescale="norm"`` rescales each layer to the Frobenius norm of KFAC's step (Fig 4C).

    **Normalisation.** ``Â`` and ``B̂`` are batch means, so the paper code's ``(η_p, λ_p)`` for
    dense layers (``A`` = batch sum, ``B`` = batch mean, mean loss) map to ``η = η_p/N``,
    ``λ = λ_p/N`` (``λ_A`` scales by ``1/N`` and ``λ_B`` is unchanged under the π rule).

    Args:
        model: the network (trained parameters in ``nn.Linear``/``nn.Conv2d`` only).
        lr: ``η > 0``.
        damping: ``λ > 0``.
        likelihood: ``"classification"`` (softmax on logits), ``"regression"`` (unit-variance
            Gaussian) or ``"binary"`` (Bernoulli on logits).
        kind: ``"mc"`` (one sampled label per input, the paper's default) or ``"exact"``.
        damping_mode: ``"heuristic"`` (eq 2, the paper's default) or ``"exact"`` (standard
            damping, eq 3; ``"standard"`` is a deprecated alias).
        variant: the direction :meth:`step` follows: ``"kfac"`` or ``"foof"`` (App. D.9).
        rescale: with ``variant="foof"``: ``None``, ``"lambda_b"`` or ``"norm"`` (see above).
        precondition_with: ``"previous"`` (default, Algorithm 1) or ``"current"``; see
            :class:`FOOF` and :mod:`curvkit.optim.factored`.
        ema_decay, inv_period, ema_steps, momentum, weight_decay: as for :class:`FOOF`.
        generator: ``torch.Generator`` for the MC labels (state saved in :meth:`state_dict`).
        params: parameters or parameter groups (per-group ``lr``, ``damping``, ``momentum``,
            ``weight_decay``).

    Data parallel: as :class:`FOOF` (both factors are averaged across ranks at inversions); use
    ``kind="exact"`` to make the result independent of how the batch is split.

    Besides ``step``: :meth:`direction` (KFAC's step, or KFAC without its second factor),
    :meth:`factors` (normalised ``Â``, ``B̂``), :meth:`initialize`, ``counts``, ``step_count``,
    :meth:`remove_hooks`.
    """

    factor_names = ("A", "B")

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        likelihood: Likelihood = "classification",
        kind: Kind = "mc",
        damping_mode: DampingMode | Literal["standard"] = "heuristic",
        ema_decay: float = 0.95,
        inv_period: int = 100,
        ema_steps: int | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        generator: torch.Generator | None = None,
        *,
        variant: str = "kfac",
        rescale: str | None = None,
        precondition_with: str = "previous",
        params: Iterable | None = None,
    ) -> None:
        check_choice(likelihood, LIKELIHOODS, "likelihood")
        if kind == "empirical":
            raise ValueError("KFAC: kind='empirical' needs the data labels, which the model's forward "
                             "pass never sees; supported kinds: 'mc', 'exact'")
        check_choice(kind, KFAC_KINDS, "kind")
        if damping_mode in DAMPING_ALIASES:
            warnings.warn(f"KFAC: damping_mode={damping_mode!r} is deprecated; use "
                          f"damping_mode={DAMPING_ALIASES[damping_mode]!r} (the same standard "
                          "damping, paper eq 3)", DeprecationWarning, stacklevel=2)
            damping_mode = DAMPING_ALIASES[damping_mode]
        check_choice(damping_mode, DAMPING_MODES, "damping_mode")
        check_variant(variant, rescale)
        self.variant, self.rescale = variant, rescale
        self.likelihood, self.kind, self.damping_mode = likelihood, kind, damping_mode
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model, params, defaults, ema_decay=ema_decay, inv_period=inv_period,
                         ema_steps=ema_steps, precondition_with=precondition_with,
                         keep_outputs=True, generator=generator,
                         needs_generator=kind == "mc")
        self.errors = ErrorRecorder(model, self.recorder, likelihood, kind, self.generator)
        self._hooks.append(self.errors)
        self._set_recording(self._records_at(self._step))

    # ------------------------------------------------------------------ recording
    def _set_recording(self, on: bool) -> None:
        super()._set_recording(on)
        if hasattr(self, "errors"):
            self.errors.enabled = on

    def _reset_records(self) -> None:
        super()._reset_records()
        if hasattr(self, "errors"):
            self.errors.reset()

    def _trained_variant(self) -> dict[str, Any]:
        return {"variant": self.variant, "rescale": self.rescale}

    def _on_refused(self) -> None:
        if self.generator is not None and self.errors.generator_state is not None:
            self.generator.set_state(self.errors.generator_state)
            self.errors.generator_state = None

    def _batch_factors(self, t: int) -> list[dict[str, Tensor]]:
        owner = type(self).__name__
        inputs = self._recorded_inputs(t)
        if self.errors.nonfinite:
            raise FloatingPointError(f"{owner}: the model output has non-finite values (nan/inf) at "
                                     f"step {t}; the step was refused and the optimizer state is "
                                     "unchanged")
        if self.errors.errors is None:
            raise RuntimeError(f"{owner}: step {t} updates the factors, but the sampled-label "
                               "backward did not run: run the forward pass with gradients enabled "
                               "before opt.step(), and make the model return its (N, C) output")
        out = [{"A": input_factor(a, symmetrize=False), "B": output_factor(e, symmetrize=False)}
               for a, e in zip(inputs, self.errors.errors)]  # e carries the 1/√N
        self._check_finite(out, {"A": "inputs", "B": "sampled-label errors"}, t)
        return out

    # ------------------------------------------------------------------ inversion and products
    def _invert(self, i: int, factors: dict[str, Tensor], damping: float) -> dict[str, Any]:
        """The factorised damped inverse of ``B̂ ⊗ Â`` as plain tensors.

        By :meth:`curvkit.linalg.Kronecker.factorize`, in the factors' dtype (which follows
        ``model.to(dtype)``); each damped side is applied ``T`` times, which decides whether it
        is held as an inverse or as its Cholesky factor.
        """
        A = factors["A"]
        K = Kronecker(factors["B"], A, name=f"KFAC[{self.layers[i].name}]")
        return K.factorize(damping, self.damping_mode, dtype=A.dtype, allow_float32=True,
                           uses=self.schedule.inv_period).state_dict()

    def _precondition(self, i: int, pieces: dict[str, Any], M: Tensor, damping: float) -> Tensor:
        inv = KroneckerInverse.from_state_dict(pieces)  # heuristic: λ fixed at inversion time
        return inv.solve_matrix(M, None if inv.fixed_damping else damping)

    def _foof_direction(self, pieces: dict[str, Any], M: Tensor) -> Tensor:
        """``M (Â + λ_A I)⁻¹`` with KFAC's ``λ_A`` (D.9)."""
        return KroneckerInverse.from_state_dict(pieces).solve_input(M)

    def _directions(self, plan: Plan, variant: str = "kfac", rescale: str | None = None
                    ) -> list[Tensor | None]:
        kfac = super()._directions(plan)
        if variant == "kfac":
            return kfac
        out: list[Tensor | None] = []
        for i, (M, D) in enumerate(zip(plan.vectors, kfac)):
            if M is None:
                out.append(None)
                continue
            pieces = self._pieces(plan, i)
            F = self._foof_direction(pieces, M)
            if rescale == "lambda_b":
                F = F / pieces["lambda_B"]
            elif rescale == "norm":
                if D is None:  # KFAC gives a direction for every layer with a gradient
                    raise RuntimeError(f"no KFAC direction for layer {i}")
                F = F * norm_ratio(D, F)
            out.append(F)
        return out

    @torch.no_grad()
    def direction(self, variant: str | None = None, rescale: str | None = None
                  ) -> list[Tensor]:
        """The parameter change ``Δθ`` of the next step, without changing any state.

        Args:
            variant: ``None`` (what :meth:`step` does: the constructor's ``variant`` and
                ``rescale``), ``"kfac"`` or ``"foof"``: KFAC without its second
                factor (App. D.9, "FOOF with λ_A from KFAC"), ``P(M) = M (Â + λ_A I)⁻¹`` with
                KFAC's normalised ``Â`` and π-rule ``λ_A`` (also under standard damping).
            rescale: for ``"foof"``: ``None``; ``"lambda_b"`` multiplies by ``1/λ_B`` (Fig 3C/D:
                keeps the step size KFAC's second factor would give); ``"norm"`` rescales each
                layer to the Frobenius norm of KFAC's direction (Fig 4C).

        Returns:
            ``−η P(M) − η ω θ`` per parameter (``param_groups`` order), where ``M`` includes the
            momentum the step would use.
        """
        if variant is None:
            if rescale is not None:
                raise ValueError("pass rescale together with variant='foof'")
            variant, rescale = self.variant, self.rescale
        check_variant(variant, rescale)
        plan = self._plan_or_undo(final=False, variant=variant, rescale=rescale)
        return self._as_update(self.layer_directions_to_params(plan.directions, plan.bufs))

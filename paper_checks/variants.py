"""KFAC variants the paper checks need beyond curvkit's defaults.

* :class:`PublicCodeStandardKFAC` -- an explicitly named **reproduction of a bug** in the paper's
  public code (``compute_kfac_udpate``): standard damping computed as
  ``U_Bᵀ [(U_B M U_A) ⊘ (s_B s_Aᵀ + λ)] U_Aᵀ``, i.e. with the B-side eigenbasis transposed
  (``torch.linalg.eigh`` returns eigenvectors as columns). The correct formula, curvkit's
  ``damping_mode="standard"``, is ``U_B [(U_Bᵀ M U_A) ⊘ (s_B s_Aᵀ + λ)] U_Aᵀ =
  mat((B̂ ⊗ Â + λI)⁻¹ vec M)``. Only Fig 3A/3B use the reproduction, next to the correct one, to
  say which of the two the paper's "standard damping ≈ SGD" needs. Not for use outside.
* App. D.9's FOOF' as a *training* direction (Fig 3D): ``ΔW = −η M (Â + λ_A I)⁻¹ / λ_B`` with
  KFAC's normalised ``Â`` and π-rule ``λ_A, λ_B``. curvkit's KFAC takes it as an option when it has
  one (:func:`direction_kwargs`); otherwise :class:`FoofPrimeKFAC` steps along
  ``KFAC.direction(variant="foof", rescale="lambda_b")`` (the same formula).
* Algorithm 1's update order: curvkit's default; :func:`order_kwargs` passes
  ``precondition_with="current"`` (the batch's own factors enter its preconditioner) when a check
  asks for it.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor

from curvkit.optim import KFAC

try:  # curvkit names standard damping "exact" (older: "standard")
    from curvkit.optim.kfac import DAMPING_MODES as _MODES
except ImportError:  # pragma: no cover - depends on the curvkit version
    _MODES = ("heuristic", "standard")
#: curvkit's name of standard damping, ``(B̂ ⊗ Â + λI)⁻¹`` (paper eq 3).
STANDARD = "exact" if "exact" in _MODES else "standard"


def _kfac_params() -> set[str]:
    return set(inspect.signature(KFAC.__init__).parameters)


def order_kwargs(precondition_with: str | None) -> dict[str, Any]:
    """Keyword arguments that select the update order (``None``: the optimizer's default)."""
    if precondition_with is None:
        return {}
    if "precondition_with" not in _kfac_params():
        raise NotImplementedError("this curvkit's KFAC/FOOF have no precondition_with option; the "
                                  "update-order comparison needs it")
    return {"precondition_with": precondition_with}


#: Names under which curvkit's KFAC may take the training direction (first match is used).
_DIRECTION_PARAMS = ("train_variant", "step_variant", "variant", "direction")


def direction_kwargs(direction: str) -> dict[str, Any]:
    """Keyword arguments for KFAC's native D.9 training mode, if it has one."""
    if direction == "kfac":
        return {}
    params = _kfac_params()
    for name in _DIRECTION_PARAMS:
        if name in params:
            out: dict[str, Any] = {name: "foof"}
            if "rescale" in params:
                out["rescale"] = "lambda_b"
            return out
    return {}


class PublicCodeStandardKFAC(KFAC):
    """KFAC whose standard damping reproduces the public code's transposed B-side eigenbasis.

    ``P(M) = U_Bᵀ [(U_B M U_A) ⊘ (s_B s_Aᵀ + λ)] U_Aᵀ`` (a bug, see the module doc); heuristic
    damping and everything else is curvkit's KFAC.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("damping_mode") not in (STANDARD, "standard"):
            raise ValueError("PublicCodeStandardKFAC reproduces the public code's standard damping; "
                             f"pass damping_mode={STANDARD!r}")
        super().__init__(*args, **kwargs)

    def _precondition(self, i: int, pieces: dict[str, Any], M: Tensor, damping: float) -> Tensor:
        UA, UB = pieces["U_A"].to(M), pieces["U_B"].to(M)
        denom = pieces["s_B"].to(M)[:, None] * pieces["s_A"].to(M)[None, :] + damping
        return UB.T @ ((UB @ M @ UA) / denom) @ UA.T


class FoofPrimeKFAC(KFAC):
    """KFAC that *steps* along App. D.9's FOOF' (``−η M (Â + λ_A I)⁻¹ / λ_B``); ``direction()``
    still returns KFAC's own direction unless asked for ``variant="foof"``."""

    def _directions(self, plan: Any, variant: str = "foof", rescale: str | None = "lambda_b"
                    ) -> list[Tensor | None]:
        return super()._directions(plan, variant=variant, rescale=rescale)


def kfac_class(standard_impl: str, direction: str) -> type[KFAC]:
    """The KFAC class for ``standard_impl`` (``"correct"``/``"public"``) and the training
    ``direction`` (``"kfac"``/``"foof_d9"``)."""
    if standard_impl not in ("correct", "public"):
        raise ValueError(f"standard_impl must be 'correct' or 'public', got {standard_impl!r}")
    if direction not in ("kfac", "foof_d9"):
        raise ValueError(f"train_direction must be 'kfac' or 'foof_d9', got {direction!r}")
    if standard_impl == "public":
        if direction != "kfac":
            raise ValueError("the public-code standard damping is only reproduced for KFAC's direction")
        return PublicCodeStandardKFAC
    if direction == "foof_d9" and not direction_kwargs(direction):
        return FoofPrimeKFAC
    return KFAC

"""Optimizers built on curvkit's curvature: FOOF, KFAC and the exact subsampled natural gradient.

All are ``torch.optim.Optimizer`` subclasses constructed from the model and used in the plain
loop ``opt.zero_grad(); loss = criterion(model(x), y); loss.backward(); opt.step()``:

* :class:`FOOF` -- gradient descent on neurons, ``ΔW = −η M (Â + λI)⁻¹`` (Algorithm 1);
* :class:`KFAC` -- ``ΔW = −η (B̂ + λ_B I)⁻¹ M (Â + λ_A I)⁻¹`` (heuristic damping) or the exact
  damped Kronecker inverse (standard damping), sampled-label errors from an extra backward;
* :class:`NaturalGradient` -- ``Δθ = −η (F̄ + λI)⁻¹ m`` with the exact subsampled Fisher
  (Woodbury), estimated on an independent batch by default.

Factors are batch means (``Â = (1/N) Σ a aᵀ``); the paper code's dense-layer hyperparameters map
as ``η = η_p/N``, ``λ = λ_p/N`` (see :class:`FOOF`). Schedule: :mod:`curvkit.optim.factored`.
"""

from curvkit.optim.base import CurvatureOptimizer
from curvkit.optim.factored import FactoredOptimizer, Schedule
from curvkit.optim.foof import FOOF
from curvkit.optim.kfac import KFAC
from curvkit.optim.natural import NaturalGradient

__all__ = ["FOOF", "KFAC", "NaturalGradient", "CurvatureOptimizer", "FactoredOptimizer", "Schedule"]

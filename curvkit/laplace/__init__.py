"""Laplace posteriors on top of curvkit's Fisher structures (Benzing 2022, App. C.1 and G).

* :class:`LaplacePosterior` -- ``N(θ_MAP, Λ⁻¹)``, ``Λ = Λ_p + num_data·F``, with exact sampling
  for the full subsampled Fisher (perturbation trick, never ``P × P``), the Laplace evidence,
  prior-precision optimisation and GLM / NN predictives; structures ``"full"``, ``"block_diag"``,
  ``"kfac"``, ``"foof"`` and ``"diag"`` through the same API.
* :class:`PriorPrecision` -- validation of scalar / per-tensor / diagonal prior precisions.
* :mod:`~curvkit.laplace.evidence` -- the evidence as pure functions;
  :mod:`~curvkit.laplace.predictive` -- predictives from the functional mean and variance.
* :func:`probit`, :func:`output_jacobian_factors` -- predictive building blocks.
"""

from curvkit.curvature.jacobian import output_jacobian_factors
from curvkit.laplace.posterior import LaplacePosterior
from curvkit.laplace.predictive import glm_predictive, nn_predictive, probit
from curvkit.laplace.prior import PriorPrecision

__all__ = ["LaplacePosterior", "PriorPrecision", "probit", "output_jacobian_factors",
           "glm_predictive", "nn_predictive"]

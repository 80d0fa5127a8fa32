"""Implicit-function-theorem hypergradients with a curvkit curvature or the exact Hessian.

Benzing (2022), App. C.3: bilevel methods need ``(λI + H)⁻¹ v``; with a subsampled
Fisher/GGN in place of ``H`` the Woodbury solve of the natural gradient applies directly.

Symbols (bound to argument names):

* ``θ`` -- ``params``, assumed at the inner optimum ``θ*(φ) = argmin_θ L_T(θ, φ)``;
* ``φ`` -- ``hparams``; ``L_T`` -- ``inner_loss()``, ``L_V`` -- ``outer_loss()``;
* ``H = ∇²_θ L_T(θ*, φ)``; ``D`` -- ``damping`` (a scalar ``λ`` or one value / tensor per
  parameter tensor, i.e. a diagonal).

By the implicit function theorem (Bengio 2000; Lorraine et al. 2020)::

    dθ*/dφ  = −H⁻¹ ∂²L_T/∂θ∂φᵀ
    dL_V/dφ = ∂_φ L_V − (∂²L_T/∂φ∂θᵀ) v,      v = (H̃ + D)⁻¹ ∇_θ L_V

and the mixed term is one double-backward, ``∂_φ ( ∇_θ L_T(θ, φ) · stopgrad(v) )``.

``H̃`` is chosen by ``curvature``:

* ``"hessian"``: the exact Hessian of ``inner_loss`` (regulariser included): dense by
  ``autograd`` rows when ``P ≤ dense_max``, else conjugate gradients on Hessian-vector products.
  ``D`` is then extra Tikhonov damping (use ``0`` for the exact IFT when ``H`` is non-singular).
* a :class:`~curvkit.curvature.Curvature` ``F`` (any structure; Woodbury for ``"full"``), or any
  :class:`~curvkit.linalg.LinearOperator` with the parameters' block shapes (e.g. ``N * F``).
  ``H ≈ F + D``, so ``D`` must carry the Hessian of the regulariser.

**Scaling.** A curvkit Fisher is the *mean* Fisher of ``−log p``, ``F = (1/N) Σₙ E[g gᵀ]``, which
for the curvkit likelihoods (softmax cross-entropy, unit-variance Gaussian ``½‖f − y‖²``,
Bernoulli on logits; ``kind="exact"``) equals the generalised Gauss-Newton matrix of the *mean*
NLL. So, for ``N`` training points:

=============================================  =================================================
``inner_loss``                                  surrogate and ``damping``
=============================================  =================================================
``mean NLL + (wd/2)‖θ‖²``                       ``curvature=F``, ``damping=wd``
``mean NLL + ½ Σ_i wd_i ‖θ_i‖²`` (per tensor)   ``curvature=F``, ``damping=[wd_1, wd_2, …]``
``sum NLL + (wd/2)‖θ‖²``                        ``curvature=N * F``, ``damping=wd``
``MSELoss(mean) = (1/(N C)) Σ ‖f − y‖²``        ``curvature=(2/C) * F`` (regression Fisher)
=============================================  =================================================

(add a small extra ``λ`` to ``damping`` when the regulariser is weak: ``F`` is rank-deficient).

**When the surrogate is exact.** ``∇²L_T = GGN + Σₙ (1/N) Σ_c (∂ℓₙ/∂f_c) ∇²_θ f_c + ∇²R``.
The residual (second) term vanishes, so ``F + D`` *is* the Hessian, when

* the model is linear in ``θ`` (``∇²f = 0``): linear / ridge regression with squared loss,
  multinomial logistic regression, with ``kind="exact"`` and the matching normalisation above
  (ridge: ``L_T = (1/N) Σ ½‖Wx − y‖² + (wd/2)‖W‖²`` gives ``H = F + wd·I`` exactly);
* or every residual ``∂ℓₙ/∂f`` is zero (interpolating regression).

Otherwise (nonlinear networks) the GGN drops the residual term; near a well-fit optimum it is
small and the hypergradient error is bounded by
``‖M‖ · ‖(F + D)⁻¹ (H − F − ∇²R)‖ · ‖v_H‖`` (``M`` the mixed Jacobian, ``v_H`` the exact ``v``).
``kind="mc"`` is an unbiased estimate of ``F``; ``kind="empirical"`` is not the GGN; KFAC / diag
structures add their own approximation error; Fisher and Hessian also differ away from a minimum.

**Data.** ``inner_loss`` and ``outer_loss`` are closures ``() -> L`` over the data they close
over, or -- with ``inner_data`` / ``outer_data`` -- per-batch losses ``loss(inputs, targets)``
returning the batch *mean*, over one batch or an iterable of batches (a ``DataLoader``; tensors,
``(inputs, targets)`` tuples, dicts, as :func:`curvkit.fisher` takes them). Then the objective
is that of the union, ``L = (1/N) Σ_k N_k L_k`` over all ``N`` data, equal to the closure on the
concatenated batch; each pass over the inner data computes ``Σ_k N_k ∇_θ L_k`` batch by batch
(nothing is kept between batches for a curvkit curvature; ``"hessian"`` keeps every batch's
gradient graph for its products).

Pieces: :mod:`~curvkit.hypergrad.core` (:func:`implicit_grad`), :mod:`~curvkit.hypergrad.objective`
(closures or per-batch losses over data), :mod:`~curvkit.hypergrad.solve` (``(H̃ + D)⁻¹ b``
through the curvkit operators or the Hessian), :mod:`~curvkit.hypergrad.cg` (conjugate
gradients).
"""

from curvkit.hypergrad.cg import conjugate_gradient
from curvkit.hypergrad.core import METHODS, implicit_grad

__all__ = ["implicit_grad", "conjugate_gradient", "METHODS"]

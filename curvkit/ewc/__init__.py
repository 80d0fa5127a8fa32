"""Elastic weight consolidation (EWC) with a subsampled full, KFAC, diagonal or any Fisher structure.

Benzing (2022), App. C.2: EWC only needs quadratic forms ``Δᵀ F Δ``, and for a
subsampled Fisher ``F = G Gᵀ`` these are cheap without ever forming ``G`` (``P × M``) or ``F``
(``P × P``): keep the per-layer inputs ``ã`` and errors ``ẽ`` of the Fisher batch and use the
``Gᵀv`` trick of the Woodbury solve.

Symbols (bound to argument names):

* ``κ`` -- ``strength``; ``γ`` -- ``decay``;
* ``θ`` -- the selected parameters (``params``), ``θ*_t`` -- their values when task ``t`` was
  consolidated, ``Δ_t = θ − θ*_t``;
* ``F_t`` -- the **mean** Fisher of task ``t``'s consolidation batch of ``N_t`` inputs,
  ``F_t = (1/N_t) Σₙ E_y[g gᵀ]`` with ``g = ∇_θ(−log p(y|xₙ, θ))`` (``kind`` chooses the
  expectation: ``"exact"`` over ``y ∼ p(·|xₙ)``, ``"mc"`` sampled, ``"empirical"`` data labels;
  see :data:`curvkit.curvature.FISHER_FORMULAS`), in the structure ``structure``;
* full structure: ``F_t = G_t G_tᵀ``, ``G_t`` with ``M_t = N_t·R`` columns (``R = C`` for
  ``"exact"``, ``mc_samples`` for ``"mc"``, 1 for ``"empirical"``); column ``m = (n, r)``
  restricted to layer ``l`` is ``vec_r(Σ_τ ẽ_{l,mτ} ã_{l,nτ}ᵀ)`` (``τ``: location, ``T_l = 1``
  for ``Linear``), the ``1/√N_t`` (and ``√p``, ``1/√S``) folded into ``ẽ``.

Penalty (``decay=None``, one anchor per task)::

    R(θ) = (κ/2) Σ_t Δ_tᵀ F_t Δ_t                  ∇R = κ Σ_t F_t Δ_t

Online / decayed accumulation (``decay=γ``; Schwarz et al. 2018, "online EWC")::

    F̃ ← γ F̃ + F_new,   θ* ← θ at the latest consolidation,   R(θ) = (κ/2) (θ − θ*)ᵀ F̃ (θ − θ*)

i.e. the older Fishers are kept (scaled by ``γ`` per later task) but measured from the latest
anchor only. ``γ = 1`` accumulates without forgetting, ``γ = 0`` keeps only the newest Fisher.

Full structure, per task (the ``Gᵀv`` trick of the Woodbury solve, App. E)::

    u_m = Σ_l Σ_τ ẽ_{l,mτ}ᵀ (W̃_l − W̃*_l) ã_{l,nτ}     (u = G*ᵀ Δ ∈ R^M)
    Δᵀ F Δ = ‖u‖²

Autograd through ``u`` (``ã``, ``ẽ`` are constants) gives ``∇(κ/2)‖u‖² = κ G* u = κ F Δ``
exactly. Cost ``O(M·P)`` per evaluation; nothing of size ``P × M`` or ``P × P`` is formed.

Scaling and the Laplace argument: the Laplace posterior after task A is
``N(θ*_A, (N_A F_A + prior)⁻¹)`` for the *summed* log-likelihood of ``N_A`` points, so adding
``(N_A/2) Δᵀ F_A Δ`` to a summed task-B loss is Bayes-consistent. With the usual *mean* task loss
``(1/N_B) Σ ℓ`` that corresponds to ``strength = N_A / N_B``; in practice ``κ`` is tuned.

Stored memory (``memory_bytes``), with ``b`` bytes per float and ``P`` selected parameters::

    full:      b · Σ_t N_t Σ_l T_l (d_in,l + R · d_out,l)   (+ b·P per stored anchor)
    diag:      b · P per stored diagonal                     (+ b·P per stored anchor)
    otherwise: the bytes of every tensor the structure's operator holds (e.g. KFAC:
               Σ_l (d_in,l² + d_out,l²) per task)

``d_in,l`` counts the bias ones column. Only the errors are stored ``R`` times; the inputs once.

Processes (``torch.distributed``, every rank passing its shard to ``consolidate``): ``F_t`` is the
Fisher of the union. kfac/foof/diag factors (and ``"full"`` / ``"block_diag"`` on the primal
route) are all-reduced and replicated. The Woodbury columns of ``"full"`` / ``"block_diag"`` are
either copied to every rank (``EWC(distributed="gather")``, the default; ``penalty()`` is the full
penalty everywhere) or kept by their ranks (``distributed="shard"``): rank ``r`` of ``W`` holds
only ``U_{t,r}`` (its ``N_r`` data, columns scaled by ``1/√N`` of the union) with
``F_t = Σ_r U_{t,r} U_{t,r}ᵀ``, and ``penalty()`` returns its **DDP share**::

    share_r = W · (κ/2) Σ_t ‖U_{t,r}ᵀ Δ_t‖²  (+ the replicated terms in full)
    (1/W) Σ_r ∇share_r = κ Σ_t Σ_r U_{t,r} U_{t,r}ᵀ Δ_t = κ Σ_t F_t Δ_t

so ``DistributedDataParallel``'s gradient averaging yields exactly the full penalty's gradient,
with no collective inside backward; ``penalty_value()`` all-reduces the shares to the full value
(``(1/W) Σ_r share_r``) for logging. The state dict then holds this rank's columns only.

Pieces (one job each): :mod:`curvkit.ewc.core` (:class:`EWC`: configuration, consolidate,
penalty, memory, state), :mod:`curvkit.ewc.terms` (the stored quadratic forms and their plain-
tensor state), :mod:`curvkit.ewc.layout` (the protected parameters by name and their layer-space
blocks).

``state_dict()`` holds only numbers, strings, lists, dicts and tensors (every structure of
:data:`~curvkit.ewc.terms.STATE_STRUCTURES`, every kind), so it loads with ``torch.load`` and its
default ``weights_only=True``.
"""

from curvkit.ewc.core import EWC

__all__ = ["EWC"]

"""Implicit-function-theorem hypergradients with a curvkit curvature or the exact Hessian.

Benzing (2022), App. C.3 (math_spec §9): bilevel methods need ``(λI + H)⁻¹ v``; with a subsampled
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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvkit.linalg import LinearOperator, SingularError

__all__ = ["implicit_grad", "conjugate_gradient"]

METHODS = ("auto", "dense", "cg")


# ---------------------------------------------------------------------- small helpers
def _check_tensors(tensors: Sequence[Tensor], what: str) -> list[Tensor]:
    if isinstance(tensors, Tensor):
        raise TypeError(f"{what} must be a sequence of tensors, got a single Tensor; wrap it: [{what}]")
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{what} is empty")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, expected a torch.Tensor")
        if not t.is_floating_point():
            raise TypeError(f"{what}[{i}] has dtype {t.dtype}; it must be floating point")
        if not t.requires_grad:
            raise ValueError(f"{what}[{i}] (shape {tuple(t.shape)}) does not require grad; call "
                             ".requires_grad_() on it")
    if len({id(t) for t in tensors}) != len(tensors):
        raise ValueError(f"{what} lists the same tensor twice")
    return tensors


def _scalar_loss(fn: Callable[[], Tensor], what: str) -> Tensor:
    if not callable(fn):
        raise TypeError(f"{what} must be a callable with no arguments returning a scalar tensor, "
                        f"got {type(fn).__name__}")
    out = fn()
    if not isinstance(out, Tensor) or out.numel() != 1:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{what}() must return a scalar tensor, got {got}")
    if not torch.isfinite(out):
        raise FloatingPointError(f"{what}() returned a non-finite value ({float(out.detach())})")
    return out.reshape(())


def _flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(x: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(x[i:i + t.numel()].reshape(t.shape).to(t.dtype))
        i += t.numel()
    return out


def _damping(damping, params: list[Tensor]) -> tuple[float | None, Tensor]:
    """``(scalar or None, flat float64 diagonal D)`` from a scalar or one entry per parameter."""
    dev = params[0].device

    def check(x: Tensor | float, what: str) -> Tensor:
        t = torch.as_tensor(x, dtype=torch.float64, device=dev).detach()
        if not torch.isfinite(t).all() or (t < 0).any():
            raise ValueError(f"{what} must be finite and ≥ 0, got {x!r}")
        return t

    if isinstance(damping, (int, float)) or (isinstance(damping, Tensor) and damping.dim() == 0):
        lam = float(check(damping, "damping"))
        P = sum(p.numel() for p in params)
        return lam, torch.full((P,), lam, dtype=torch.float64, device=dev)
    if not isinstance(damping, (list, tuple)) or len(damping) != len(params):
        raise ValueError(
            f"damping must be a number or a list with one number/tensor per parameter tensor "
            f"({len(params)}), got {type(damping).__name__}"
            + (f" of length {len(damping)}" if isinstance(damping, (list, tuple)) else ""))
    parts = []
    for i, (d, p) in enumerate(zip(damping, params)):
        t = check(d, f"damping[{i}]")
        try:
            parts.append(torch.broadcast_to(t, p.shape).reshape(-1))
        except RuntimeError as err:
            raise ValueError(f"damping[{i}] of shape {tuple(t.shape)} does not broadcast to "
                             f"params[{i}] of shape {tuple(p.shape)}") from err
    D = torch.cat(parts)
    if bool((D == D[0]).all()):
        return float(D[0]), D
    return None, D


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    precond: Callable[[Tensor], Tensor] | None = None,
    tol: float = 1e-10,
    maxiter: int | None = None,
) -> tuple[Tensor, int, float]:
    """(Preconditioned) conjugate gradients for ``A x = b`` with ``A`` symmetric positive definite.

    Args:
        matvec: ``x ↦ A x`` on flat tensors.
        b: right-hand side ``(P,)``.
        precond: ``r ↦ M⁻¹ r`` for an SPD preconditioner ``M ≈ A`` (default: none).
        tol: stop when ``‖b − A x‖ ≤ tol · ‖b‖``.
        maxiter: iteration cap (default ``max(100, 2·P)``).

    Returns:
        ``(x, iterations, relative residual)``; warns if ``tol`` was not reached.

    Raises:
        SingularError: ``A`` is not positive definite along a search direction.
    """
    maxiter = max(100, 2 * b.numel()) if maxiter is None else int(maxiter)
    x = torch.zeros_like(b)
    bnorm = float(torch.linalg.vector_norm(b))
    if bnorm == 0.0:
        return x, 0, 0.0
    r = b.clone()
    z = precond(r) if precond is not None else r
    p = z.clone()
    rz = torch.dot(r, z)
    res = 1.0
    for k in range(1, maxiter + 1):
        Ap = matvec(p)
        pAp = torch.dot(p, Ap)
        if not pAp > 0:
            raise SingularError(
                f"conjugate gradients: the system matrix is not positive definite (pᵀAp = "
                f"{float(pAp):.3g} at iteration {k}); the Hessian is indefinite at this point -- "
                "increase damping or use method='dense'")
        alpha = rz / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        res = float(torch.linalg.vector_norm(r)) / bnorm
        if res <= tol:
            return x, k, res
        z = precond(r) if precond is not None else r
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    warnings.warn(f"conjugate gradients stopped after {maxiter} iterations at relative residual "
                  f"{res:.3g} > tol={tol:g}; increase maxiter or damping", RuntimeWarning,
                  stacklevel=2)
    return x, maxiter, res


# ---------------------------------------------------------------------- Hessian pieces
def _hvp_fn(g_T: list[Tensor], params: list[Tensor]) -> Callable[[Tensor], Tensor]:
    """``x ↦ ∇²_θ L_T · x`` (float64 flat in and out) by double-backward through ``g_T``."""
    live = [i for i, g in enumerate(g_T) if g.requires_grad]
    P = sum(p.numel() for p in params)

    def hvp(x: Tensor) -> Tensor:
        if not live:
            return torch.zeros(P, dtype=torch.float64, device=x.device)
        xs = _unflat(x, params)
        hs = torch.autograd.grad([g_T[i] for i in live], params, [xs[i] for i in live],
                                 retain_graph=True, allow_unused=True)
        return _flat([torch.zeros_like(p) if h is None else h for h, p in zip(hs, params)]).to(
            torch.float64)

    return hvp


def _dense_hessian(g_T: list[Tensor], params: list[Tensor], chunk: int = 256) -> Tensor:
    """``∇²_θ L_T`` as a ``(P, P)`` float64 matrix, rows by batched double-backward."""
    P = sum(p.numel() for p in params)
    dtype, dev = params[0].dtype, params[0].device
    live = [i for i, g in enumerate(g_T) if g.requires_grad]
    H = torch.zeros(P, P, dtype=torch.float64, device=dev)
    if not live:
        return H
    offs = [0]
    for p in params:
        offs.append(offs[-1] + p.numel())
    hvp = _hvp_fn(g_T, params)
    for s in range(0, P, chunk):
        E = torch.eye(P, dtype=dtype, device=dev)[s:s + chunk]
        B = E.shape[0]
        go = [E[:, offs[i]:offs[i + 1]].reshape(B, *params[i].shape) for i in live]
        try:
            hs = torch.autograd.grad([g_T[i] for i in live], params, go, retain_graph=True,
                                     allow_unused=True, is_grads_batched=True)
            rows = torch.cat([
                (torch.zeros(B, p.numel(), dtype=dtype, device=dev) if h is None
                 else h.reshape(B, -1)) for h, p in zip(hs, params)], dim=1)
        except RuntimeError:  # an op without a batching rule: one row at a time
            rows = torch.stack([hvp(E[j].to(torch.float64)) for j in range(B)])
        H[s:s + B] = rows.to(torch.float64)
    return 0.5 * (H + H.T)


# ---------------------------------------------------------------------- main entry
def implicit_grad(
    inner_loss: Callable[[], Tensor],
    outer_loss: Callable[[], Tensor],
    params: Sequence[Tensor],
    hparams: Sequence[Tensor],
    *,
    curvature: LinearOperator | str,
    damping: float | Sequence[float | Tensor] = 1e-3,
    method: str = "auto",
    dense_max: int = 2000,
    tol: float | None = None,
    maxiter: int | None = None,
    allow_unused: bool = False,
    return_info: bool = False,
) -> list[Tensor] | tuple[list[Tensor], dict]:
    """Hypergradient ``dL_V/dφ = ∂_φ L_V − ∂²_{φθ} L_T · (H̃ + D)⁻¹ ∇_θ L_V`` at ``θ = θ*(φ)``.

    ``inner_loss`` and ``outer_loss`` are closures with no arguments that read the *current*
    values of ``params`` and ``hparams`` (e.g. a model whose parameters are ``params`` and a
    loss that uses ``hparams`` directly, not detached copies or Python floats) and return scalar
    tensors. ``inner_loss`` is called once (its gradient graph is kept for the mixed term and,
    for ``"hessian"``, Hessian-vector products); ``outer_loss`` once. Call this after solving the
    inner problem: the IFT assumes ``∇_θ L_T(θ, φ) = 0``.

    Args:
        inner_loss: ``() -> L_T(θ, φ)``, the training objective whose minimiser is ``θ*(φ)``.
        outer_loss: ``() -> L_V(θ, φ)``, e.g. the validation loss (may or may not read ``φ``).
        params: ``θ``, tensors requiring grad (for a curvkit curvature: exactly ``F.params``).
        hparams: ``φ``, tensors requiring grad that ``inner_loss`` reads.
        curvature: ``"hessian"`` (exact reference) or a curvkit
            :class:`~curvkit.curvature.Curvature` / :class:`~curvkit.linalg.LinearOperator`
            (any structure) approximating ``∇²_θ L_T − D``; see the module docstring for the
            normalisation (``F`` is the *mean* Fisher).
        damping: ``D``: a number ``λ ≥ 0`` or one number / tensor (broadcastable to the
            parameter's shape) per parameter tensor, e.g. per-layer weight decays.
        method: ``"auto"``, ``"dense"`` or ``"cg"``. ``"auto"``: an operator with a scalar
            damping uses its own ``solve`` (Woodbury, Kronecker, ...); with a per-parameter
            damping it runs conjugate gradients on ``F + D`` preconditioned by
            ``(F + cI)⁻¹`` (``c`` the geometric mean of ``min D`` and ``max D``); ``"hessian"``
            is dense when ``P ≤ dense_max``, else CG on Hessian-vector products. ``"dense"``
            forms the ``P × P`` matrix; ``"cg"`` forces plain CG on products only -- the cheaper
            choice when factorising the operator is expensive (e.g. a ``"full"`` Fisher with
            ``M = N·C`` columns in the tens of thousands, whose solve forms ``P × P`` or
            ``M × M`` matrices).
        dense_max: largest ``P`` for the dense Hessian under ``method="auto"``.
        tol: CG relative residual tolerance (default ``1e-10`` for float64 parameters,
            ``1e-5`` otherwise).
        maxiter: CG iteration cap.
        allow_unused: if ``False`` (default), an hparam that does not influence ``∇_θ L_T``
            (so ``dθ*/dφ = 0``), or an ``outer_loss`` that does not depend on ``params``,
            raises; if ``True`` their implicit term is taken as zero.
        return_info: also return ``{"v", "method", "iterations", "residual"}``.

    Returns:
        The hypergradients, one tensor per hparam (detached, same shapes); with
        ``return_info``, a tuple ``(hypergradients, info)``.

    Raises:
        ValueError: bad arguments, an unused hparam / param (unless ``allow_unused``), a
            curvature built for other parameters.
        FloatingPointError: a non-finite loss, gradient, ``v`` or hypergradient.
        SingularError: ``H̃ + D`` is singular (increase ``damping``).
    """
    params = _check_tensors(params, "params")
    hparams = _check_tensors(hparams, "hparams")
    if {id(p) for p in params} & {id(h) for h in hparams}:
        raise ValueError("a tensor appears in both params and hparams; they must be disjoint")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {list(METHODS)}")
    if isinstance(curvature, str):
        if curvature != "hessian":
            raise ValueError(f"unknown curvature {curvature!r}; pass 'hessian' or a curvkit "
                             "Curvature / LinearOperator (e.g. curvkit.fisher(model, x, y))")
    elif not isinstance(curvature, LinearOperator):
        raise TypeError(f"curvature must be 'hessian' or a curvkit Curvature / LinearOperator, got "
                        f"{type(curvature).__name__}")
    else:
        _check_operator(curvature, params)
    lam, D = _damping(damping, params)
    if tol is None:
        tol = 1e-10 if params[0].dtype == torch.float64 else 1e-5

    with torch.enable_grad():
        L_T = _scalar_loss(inner_loss, "inner_loss")
        g_T = list(torch.autograd.grad(L_T, params, create_graph=True, allow_unused=True))
        for i, g in enumerate(g_T):
            if g is None:
                raise ValueError(
                    f"params[{i}] (shape {tuple(params[i].shape)}) does not influence inner_loss(); "
                    "θ*(φ) is not defined in it -- remove it from params")
        if not all(torch.isfinite(g).all() for g in g_T):
            raise FloatingPointError("∇_θ inner_loss has non-finite entries")
        L_V = _scalar_loss(outer_loss, "outer_loss")
        grads = torch.autograd.grad(L_V, params + hparams, allow_unused=True)
        gV, dphi = list(grads[:len(params)]), list(grads[len(params):])
        if all(g is None for g in gV) and not allow_unused:
            raise ValueError("outer_loss() does not depend on params, so the implicit term is zero; "
                             "pass allow_unused=True if that is intended")
        gV = [torch.zeros_like(p) if g is None else g for g, p in zip(gV, params)]
        if not all(torch.isfinite(g).all() for g in gV):
            raise FloatingPointError("∇_θ outer_loss has non-finite entries")
        b = _flat(gV).detach().to(torch.float64)

        if isinstance(curvature, str):
            v, info = _solve_hessian(g_T, params, b, D, method, dense_max, tol, maxiter)
        else:
            v, info = _solve_operator(curvature, params, b, lam, D, method, tol, maxiter)
        if not torch.isfinite(v).all():
            raise FloatingPointError(f"v = (H̃ + D)⁻¹ ∇_θ L_V is non-finite ({info['method']}); "
                                     "increase damping")
        v_list = [t.detach() for t in _unflat(v, params)]

        # mixed term ∂_φ (∇_θ L_T · stopgrad(v)): one double-backward
        s = sum((g * vi).sum() for g, vi in zip(g_T, v_list))
        mixed: list[Tensor | None]
        if isinstance(s, Tensor) and s.requires_grad:
            mixed = list(torch.autograd.grad(s, hparams, allow_unused=True))
        else:
            mixed = [None] * len(hparams)

    out = []
    for i, (h, m, d) in enumerate(zip(hparams, mixed, dphi)):
        if m is None:
            if not allow_unused:
                raise ValueError(
                    f"hparams[{i}] (shape {tuple(h.shape)}) does not influence ∇_θ inner_loss, so "
                    "θ*(φ) does not depend on it and its implicit hypergradient would be silently "
                    "zero. Make inner_loss() read this tensor itself (not a detached copy or a "
                    "Python float); if it only enters outer_loss, pass allow_unused=True.")
            m = torch.zeros_like(h)
        grad = (torch.zeros_like(h) if d is None else d) - m
        if not torch.isfinite(grad).all():
            raise FloatingPointError(f"the hypergradient of hparams[{i}] is non-finite")
        out.append(grad.detach())
    if return_info:
        info["v"] = v_list
        return out, info
    return out


def _check_operator(op: LinearOperator, params: list[Tensor]) -> None:
    shapes = [tuple(p.shape) for p in params]
    if op.block_shapes is None or [tuple(s) for s in op.block_shapes] != shapes:
        got = None if op.block_shapes is None else [tuple(s) for s in op.block_shapes]
        raise ValueError(f"curvature {op.name} has block shapes {got} but params have {shapes}; "
                         "build it with curvkit.fisher(model, x, y, params=params)")
    op_params = getattr(op, "params", None)
    if op_params is not None and any(a is not b for a, b in zip(op_params, params)):
        raise ValueError(f"curvature {op.name} was built for other parameter tensors than params; "
                         "build it with curvkit.fisher(model, x, y, params=params) at θ*")
    if op.dtype != params[0].dtype:
        raise TypeError(f"curvature works in {op.dtype} but params are {params[0].dtype}")


def _solve_hessian(g_T, params, b, D, method, dense_max, tol, maxiter) -> tuple[Tensor, dict]:
    P = b.numel()
    if method == "dense" or (method == "auto" and P <= dense_max):
        A = _dense_hessian(g_T, params) + torch.diag(D)
        v, info = torch.linalg.solve_ex(A, b)
        if int(info) != 0 or not torch.isfinite(v).all():
            raise SingularError(f"Hessian + damping (P = {P}) is singular; pass damping > 0")
        res = float(torch.linalg.vector_norm(A @ v - b) / max(float(torch.linalg.vector_norm(b)),
                                                               1e-300))
        return v, {"method": "hessian-dense", "iterations": None, "residual": res}
    hvp = _hvp_fn(g_T, params)
    v, it, res = conjugate_gradient(lambda x: hvp(x) + D * x, b, tol=tol, maxiter=maxiter)
    return v, {"method": "hessian-cg", "iterations": it, "residual": res}


def _solve_operator(op, params, b, lam, D, method, tol, maxiter) -> tuple[Tensor, dict]:
    def to_op(x: Tensor) -> Tensor:
        return x.to(op.dtype)

    def mv(x: Tensor) -> Tensor:
        return (op @ to_op(x)).to(torch.float64) + D * x

    bnorm = max(float(torch.linalg.vector_norm(b)), 1e-300)
    if method == "dense":
        A = op.to_dense().to(torch.float64) + torch.diag(D)
        v, info = torch.linalg.solve_ex(A, b)
        if int(info) != 0:
            raise SingularError(f"{op.name} + damping is singular; pass damping > 0")
        return v, {"method": "operator-dense", "iterations": None,
                   "residual": float(torch.linalg.vector_norm(A @ v - b)) / bnorm}
    if lam is not None and method == "auto":
        v = op.solve(to_op(b), lam).to(torch.float64)
        res = float(torch.linalg.vector_norm(mv(v) - b)) / bnorm
        return v, {"method": "operator-solve", "iterations": None, "residual": res}
    if method == "auto" and D.min() > 0:
        c = math.sqrt(float(D.min()) * float(D.max()))
        try:
            v, it, res = conjugate_gradient(
                mv, b, precond=lambda r: op.solve(to_op(r), c).to(torch.float64), tol=tol,
                maxiter=maxiter)
            return v, {"method": "operator-pcg", "iterations": it, "residual": res}
        except NotImplementedError:  # the structure has no solve: plain CG below
            pass
    v, it, res = conjugate_gradient(mv, b, tol=tol, maxiter=maxiter)
    return v, {"method": "operator-cg", "iterations": it, "residual": res}

"""``implicit_grad``: the implicit-function-theorem hypergradient (see :mod:`curvkit.hypergrad`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from curvkit.hypergrad.objective import Objective, check_tensors, union_mean
from curvkit.hypergrad.solve import (
    Terms,
    check_operator,
    diagonal_damping,
    flat,
    solve_hessian,
    solve_operator,
    unflat,
)
from curvkit.linalg import LinearOperator

__all__ = ["implicit_grad", "METHODS"]

METHODS = ("auto", "dense", "cg")


def _inner_terms(inner: Objective, params: list[Tensor]) -> Iterator[tuple[float, list[Tensor]]]:
    """``(w_k, ∇_θ L_k)`` with graphs, per term; checks each parameter is used and finite."""
    used = [False] * len(params)
    for w, g in inner.gradients(params, create_graph=True):
        for i, gi in enumerate(g):
            used[i] = used[i] or gi is not None
        if inner.data is None and not all(used):
            break
        full = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
        if not all(torch.isfinite(gi).all() for gi in full):
            raise FloatingPointError("∇_θ inner_loss has non-finite entries")
        yield w, full
    for i, u in enumerate(used):
        if not u:
            raise ValueError(
                f"params[{i}] (shape {tuple(params[i].shape)}) does not influence inner_loss(); "
                "θ*(φ) is not defined in it -- remove it from params")


def _mixed(terms: Terms | Iterator[tuple[float, list[Tensor]]], v: list[Tensor],
           hparams: list[Tensor], distributed: bool) -> list[Tensor | None]:
    """The mixed term ``∂_φ (∇_θ L_T · stopgrad(v)) = (1/W) Σ_k w_k ∂_φ (∇_θ L_k · v)``.

    One double-backward per term; ``None`` where ``φ_i`` does not reach ``∇_θ L_T``.
    """
    parts: list[list[Tensor]] = [[] for _ in hparams]
    weights: list[list[float]] = [[] for _ in hparams]
    total = 0.0
    for w, g in terms:
        total += w
        s = sum((gi * vi).sum() for gi, vi in zip(g, v))
        if isinstance(s, Tensor) and s.requires_grad:
            for i, m in enumerate(torch.autograd.grad(s, hparams, allow_unused=True)):
                if m is not None:
                    parts[i].append(m)
                    weights[i].append(w)
    return union_mean(parts, weights, total, hparams, distributed)


def implicit_grad(
    inner_loss: Callable[..., Tensor],
    outer_loss: Callable[..., Tensor],
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
    inner_data: Any = None,
    outer_data: Any = None,
    progress: bool | None = None,
) -> list[Tensor] | tuple[list[Tensor], dict]:
    """Hypergradient ``dL_V/dφ = ∂_φ L_V − ∂²_{φθ} L_T · (H̃ + D)⁻¹ ∇_θ L_V`` at ``θ = θ*(φ)``.

    Benzing (2022), App. C.3: with a curvkit Fisher in place of ``H̃`` the Woodbury solve of the
    natural gradient applies directly. ``inner_loss`` and ``outer_loss`` read the *current*
    values of ``params`` and ``hparams`` (e.g. a model whose parameters are ``params`` and a loss
    that uses ``hparams`` directly, not detached copies or Python floats) and return scalar
    tensors. Without data they are closures ``() -> L``: ``inner_loss`` is called once (its
    gradient graph is kept for the mixed term and, for ``"hessian"``, Hessian-vector products),
    ``outer_loss`` once. With ``inner_data`` / ``outer_data`` they are per-batch losses
    ``loss(inputs, targets)`` (the batch mean) and the objective is that of the union of the
    batches, ``L = (1/N) Σ_k N_k L_k`` (see :mod:`curvkit.hypergrad.objective`): ``outer_loss``
    is called once per batch, ``inner_loss`` once per batch for a curvkit curvature (after the
    solve) and once per batch, graphs kept, for ``"hessian"``. Call this after solving the inner
    problem: the IFT assumes ``∇_θ L_T(θ, φ) = 0``.

    Args:
        inner_loss: ``() -> L_T(θ, φ)`` (or ``(inputs, targets) -> L_T,k`` with
            ``inner_data``), the training objective whose minimiser is ``θ*(φ)``.
        outer_loss: ``() -> L_V(θ, φ)`` (or per batch with ``outer_data``), e.g. the validation
            loss (may or may not read ``φ``).
        params: ``θ``, tensors requiring grad (for a curvkit curvature: exactly ``F.params``).
        hparams: ``φ``, tensors requiring grad that ``inner_loss`` reads.
        curvature: ``"hessian"`` (exact reference) or a curvkit
            :class:`~curvkit.curvature.Curvature` / :class:`~curvkit.linalg.LinearOperator`
            (any structure) approximating ``∇²_θ L_T − D``; see :mod:`curvkit.hypergrad` for the
            normalisation (``F`` is the *mean* Fisher; build it on the same data, e.g.
            ``curvkit.fisher(model, train_loader)``).
        damping: ``D``: a number ``λ ≥ 0`` or one number / tensor (broadcastable to the
            parameter's shape) per parameter tensor, e.g. per-layer weight decays.
        method: ``"auto"``, ``"dense"`` or ``"cg"``. ``"auto"``: an operator with a scalar
            damping uses its own ``solve`` (Woodbury, Kronecker, ...); with a per-parameter
            damping it runs conjugate gradients on ``F + D`` preconditioned by
            ``(F + cI)⁻¹`` (``c`` the geometric mean of ``min D`` and ``max D``); ``"hessian"``
            is dense when ``P ≤ dense_max``, else CG on Hessian-vector products. ``"dense"``
            forms the ``P × P`` matrix (solved by linalg's float64 Cholesky; an indefinite or
            singular matrix raises); ``"cg"`` forces plain CG on products only -- the cheaper
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
        inner_data: ``None`` (``inner_loss`` is a closure), one batch, or an iterable of
            batches (a ``DataLoader``; tensors, ``(inputs, targets)`` tuples or dicts). With an
            initialised ``torch.distributed`` group, this rank's shard: the sums over batches
            are all-reduced, giving the union of every rank's data (pair it with the union
            Fisher ``curvkit.fisher(model, shard_loader)``; ``"hessian"`` is then refused).
        outer_data: the same for ``outer_loss``.
        progress: tqdm bars over iterables of batches (default on).

    Returns:
        The hypergradients, one tensor per hparam (detached, same shapes); with
        ``return_info``, a tuple ``(hypergradients, info)``.

    Raises:
        NotImplementedError: ``curvature="hessian"`` with ``inner_data`` under
            ``torch.distributed``.
        TypeError: a loss that is not callable, a curvature of the wrong type or dtype.
        ValueError: bad arguments, an unused hparam / param (unless ``allow_unused``), a
            curvature built for other parameters, data without batches.
        FloatingPointError: a non-finite loss, gradient, ``v`` or hypergradient.
        SingularError: ``H̃ + D`` is singular (increase ``damping``).
    """
    params = check_tensors(params, "params")
    hparams = check_tensors(hparams, "hparams")
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
        check_operator(curvature, params)
    lam, D = diagonal_damping(damping, params)
    if tol is None:
        tol = 1e-10 if params[0].dtype == torch.float64 else 1e-5
    inner = Objective(inner_loss, inner_data, "inner_loss", progress)
    outer = Objective(outer_loss, outer_data, "outer_loss", progress)
    if inner.distributed and isinstance(curvature, str):
        raise NotImplementedError(
            "curvature='hessian' with inner_data under torch.distributed is not supported (its "
            "products would need every rank's graphs); pass a curvkit curvature of the union, "
            "e.g. curvkit.fisher(model, train_loader), or a closure")

    with torch.enable_grad():
        # the gradient terms of L_T with graphs: kept for a closure and for the Hessian; over
        # data with a curvkit curvature they are streamed once, after the solve
        keep = inner_data is None or isinstance(curvature, str)
        terms: Terms | None = list(_inner_terms(inner, params)) if keep else None
        grads = outer.mean_gradient(params + hparams)
        gV, dphi = list(grads[:len(params)]), list(grads[len(params):])
        if all(g is None for g in gV) and not allow_unused:
            raise ValueError("outer_loss() does not depend on params, so the implicit term is zero; "
                             "pass allow_unused=True if that is intended")
        gV_full = [torch.zeros_like(p) if g is None else g for g, p in zip(gV, params)]
        if not all(torch.isfinite(g).all() for g in gV_full):
            raise FloatingPointError("∇_θ outer_loss has non-finite entries")
        b = flat(gV_full).detach().to(torch.float64)

        if isinstance(curvature, str):
            assert terms is not None
            v, info = solve_hessian(terms, params, b, D, method, dense_max, tol, maxiter)
        else:
            v, info = solve_operator(curvature, b, lam, D, method, tol, maxiter)
        if not torch.isfinite(v).all():
            raise FloatingPointError(f"v = (H̃ + D)⁻¹ ∇_θ L_V is non-finite ({info['method']}); "
                                     "increase damping")
        v_list = [t.detach() for t in unflat(v, params)]
        mixed = _mixed(terms if terms is not None else _inner_terms(inner, params), v_list,
                       hparams, inner.distributed)

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

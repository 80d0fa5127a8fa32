"""``v = (H̃ + D)⁻¹ b`` for the implicit hypergradient (Benzing 2022, App. C.3).

``H̃`` is a curvkit operator (its own ``solve`` -- Woodbury, Kronecker, ... -- or conjugate
gradients on its products) or the exact Hessian of the inner loss (dense from batched
double-backward rows, or conjugate gradients on Hessian-vector products). Every factorisation
is linalg's: a dense system is a :class:`~curvkit.linalg.Dense` operator, solved by its damped
float64 Cholesky (:func:`~curvkit.linalg.damped_cholesky`, eigendecomposition fallback; a
singular or indefinite matrix raises :class:`~curvkit.linalg.SingularError`).

The inner loss enters as gradient *terms* ``(w_k, ∇_θ L_k)`` (graphs kept), with
``∇²_θ L_T = (1/W) Σ_k w_k ∇²_θ L_k`` and ``W = Σ_k w_k`` (one term ``(1, ∇_θ L_T)`` for a
closure; ``w_k = N_k`` over batches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvkit.hypergrad.cg import conjugate_gradient
from curvkit.hypergrad.objective import weighted_mean
from curvkit.linalg import Dense, LinearOperator, SingularError

__all__ = ["Terms", "flat", "unflat", "diagonal_damping", "check_operator", "solve_hessian",
           "solve_operator"]

#: Gradient terms ``[(w_k, ∇_θ L_k), ...]`` (graphs kept for double-backward).
Terms = list[tuple[float, list[Tensor]]]


def flat(ts: Sequence[Tensor]) -> Tensor:
    """Concatenate flattened tensors."""
    return torch.cat([t.reshape(-1) for t in ts])


def unflat(x: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped (and typed) like ``like``."""
    out, i = [], 0
    for t in like:
        out.append(x[i:i + t.numel()].reshape(t.shape).to(t.dtype))
        i += t.numel()
    return out


def diagonal_damping(damping, params: list[Tensor]) -> tuple[float | None, Tensor]:
    """``(scalar or None, flat float64 diagonal D)`` from a scalar or one entry per parameter.

    Raises:
        ValueError: a negative / non-finite entry, a wrong length or a non-broadcastable shape.
    """
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


def check_operator(op: LinearOperator, params: list[Tensor]) -> None:
    """The operator acts on exactly ``params`` (block shapes, tensors, dtype).

    Raises:
        ValueError: other block shapes or other parameter tensors.
        TypeError: another dtype.
    """
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


# ---------------------------------------------------------------------- Hessian pieces
def _live(g: list[Tensor]) -> list[int]:
    return [i for i, gi in enumerate(g) if gi.requires_grad]


def _hvp_fn(terms: Terms, params: list[Tensor]) -> Callable[[Tensor], Tensor]:
    """``x ↦ ∇²_θ L_T · x`` (float64 flat in and out) by double-backward through each term."""
    P = sum(p.numel() for p in params)

    def one(g: list[Tensor], x: Tensor) -> Tensor:
        live = _live(g)
        if not live:
            return torch.zeros(P, dtype=torch.float64, device=x.device)
        xs = unflat(x, params)
        hs = torch.autograd.grad([g[i] for i in live], params, [xs[i] for i in live],
                                 retain_graph=True, allow_unused=True)
        return flat([torch.zeros_like(p) if h is None else h for h, p in zip(hs, params)]).to(
            torch.float64)

    def hvp(x: Tensor) -> Tensor:
        return weighted_mean([one(g, x) for _, g in terms], [w for w, _ in terms],
                             sum(w for w, _ in terms))

    return hvp


def _dense_hessian_term(g: list[Tensor], params: list[Tensor], chunk: int = 256) -> Tensor:
    """``∇²_θ L_k`` as a ``(P, P)`` float64 matrix, rows by batched double-backward."""
    P = sum(p.numel() for p in params)
    dtype, dev = params[0].dtype, params[0].device
    live = _live(g)
    H = torch.zeros(P, P, dtype=torch.float64, device=dev)
    if not live:
        return H
    offs = [0]
    for p in params:
        offs.append(offs[-1] + p.numel())
    hvp = _hvp_fn([(1.0, g)], params)
    for s in range(0, P, chunk):
        E = torch.eye(P, dtype=dtype, device=dev)[s:s + chunk]
        B = E.shape[0]
        go = [E[:, offs[i]:offs[i + 1]].reshape(B, *params[i].shape) for i in live]
        try:
            hs = torch.autograd.grad([g[i] for i in live], params, go, retain_graph=True,
                                     allow_unused=True, is_grads_batched=True)
            rows = torch.cat([
                (torch.zeros(B, p.numel(), dtype=dtype, device=dev) if h is None
                 else h.reshape(B, -1)) for h, p in zip(hs, params)], dim=1)
        except RuntimeError:  # an op without a batching rule: one row at a time
            rows = torch.stack([hvp(E[j].to(torch.float64)) for j in range(B)])
        H[s:s + B] = rows.to(torch.float64)
    return H


def _dense_solve(A: Tensor, b: Tensor, what: str) -> tuple[Tensor, float]:
    """``A⁻¹ b`` through linalg's :class:`Dense` operator; returns ``(v, relative residual)``."""
    try:
        v = Dense(A, name=what).solve(b, 0.0)
    except SingularError as err:
        raise SingularError(f"{what} is not positive definite ({err}); the implicit function "
                            "theorem needs θ at a minimum of inner_loss -- solve the inner "
                            "problem further or increase damping") from err
    assert isinstance(v, Tensor)
    res = float(torch.linalg.vector_norm(A @ v - b) / max(float(torch.linalg.vector_norm(b)),
                                                           1e-300))
    return v, res


def solve_hessian(terms: Terms, params, b, D, method, dense_max, tol, maxiter
                  ) -> tuple[Tensor, dict]:
    """``(∇²_θ L_T + D)⁻¹ b``: dense (``P ≤ dense_max`` or ``method="dense"``) or CG.

    Raises:
        SingularError: the matrix is singular or indefinite (dense), or not positive definite
            along a search direction (CG).
    """
    P = b.numel()
    if method == "dense" or (method == "auto" and P <= dense_max):
        H = weighted_mean([_dense_hessian_term(g, params) for _, g in terms],
                          [w for w, _ in terms], sum(w for w, _ in terms))
        A = 0.5 * (H + H.T) + torch.diag(D)
        v, res = _dense_solve(A, b, f"Hessian + damping (P = {P})")
        return v, {"method": "hessian-dense", "iterations": None, "residual": res}
    hvp = _hvp_fn(terms, params)
    v, it, res = conjugate_gradient(lambda x: hvp(x) + D * x, b, tol=tol, maxiter=maxiter)
    return v, {"method": "hessian-cg", "iterations": it, "residual": res}


def solve_operator(op: LinearOperator, b: Tensor, lam: float | None, D: Tensor, method: str,
                   tol: float, maxiter: int | None) -> tuple[Tensor, dict]:
    """``(F + D)⁻¹ b`` for a curvkit operator ``F`` (see ``implicit_grad``'s ``method``).

    Raises:
        SingularError: ``F + D`` is singular.
    """
    def to_op(x: Tensor) -> Tensor:
        return x.to(op.dtype)

    def mv(x: Tensor) -> Tensor:
        y = op @ to_op(x)
        assert isinstance(y, Tensor)
        return y.to(torch.float64) + D * x

    def op_solve(x: Tensor, damping: float) -> Tensor:
        y = op.solve(to_op(x), damping)
        assert isinstance(y, Tensor)
        return y.to(torch.float64)

    bnorm = max(float(torch.linalg.vector_norm(b)), 1e-300)
    if method == "dense":
        A = op.to_dense().to(torch.float64) + torch.diag(D)
        v, res = _dense_solve(A, b, f"{op.name} + damping")
        return v, {"method": "operator-dense", "iterations": None, "residual": res}
    if lam is not None and method == "auto":
        v = op_solve(b, lam)
        res = float(torch.linalg.vector_norm(mv(v) - b)) / bnorm
        return v, {"method": "operator-solve", "iterations": None, "residual": res}
    if method == "auto" and D.min() > 0:
        c = math.sqrt(float(D.min()) * float(D.max()))
        try:
            v, it, res = conjugate_gradient(mv, b, precond=lambda r: op_solve(r, c), tol=tol,
                                            maxiter=maxiter)
            return v, {"method": "operator-pcg", "iterations": it, "residual": res}
        except NotImplementedError:  # the structure has no solve: plain CG below
            pass
    v, it, res = conjugate_gradient(mv, b, tol=tol, maxiter=maxiter)
    return v, {"method": "operator-cg", "iterations": it, "residual": res}


"""Check a :class:`~curvkit.linalg.LinearOperator` against an explicit matrix in every format.

One helper, :func:`assert_operator_matches`, exercises the whole operator contract (``@`` on
``(P,)``, ``(P, k)`` and list vectors, ``to_dense``, ``diagonal``, ``to_scipy``, and with a damping
``λ`` also ``solve``, ``inverse`` and ``logdet``) against a dense ground truth ``A`` (float64).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from curvkit.linalg.operator import LinearOperator

__all__ = ["assert_operator_matches"]

#: number of right-hand sides used for the ``(P, k)`` format.
K_COLUMNS = 3


def _close(actual: Tensor, expected: Tensor, rtol: float, atol: float, what: str) -> None:
    """``|actual − expected| ≤ atol + rtol·max|expected| + rtol·|expected|`` elementwise.

    The ``rtol·max|expected|`` term scales the absolute tolerance with the size of the result, so
    entries that are small only through cancellation do not fail on round-off.
    """
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol + rtol * scale,
        msg=lambda m: f"{what}: {m}",
    )


def _check_format(result, v, what: str, op: LinearOperator) -> None:
    """``result`` must come back in the format of ``v`` (same shapes, op's dtype)."""
    if isinstance(v, list):
        if not isinstance(result, list) or len(result) != len(v):
            raise AssertionError(f"{what}: expected a list of {len(v)} tensors, got {type(result)}")
        for i, (r, t) in enumerate(zip(result, v)):
            if r.shape != t.shape or r.dtype != op.dtype:
                raise AssertionError(
                    f"{what}[{i}]: got {tuple(r.shape)} {r.dtype}, expected {tuple(t.shape)} "
                    f"{op.dtype}"
                )
        return
    if not isinstance(result, Tensor) or result.shape != v.shape or result.dtype != op.dtype:
        got = (tuple(result.shape), result.dtype) if isinstance(result, Tensor) else type(result)
        raise AssertionError(f"{what}: got {got}, expected {tuple(v.shape)} {op.dtype}")


def _flat(v) -> Tensor:
    """``(P, k)`` float64 view of a vector in any format (list -> one column)."""
    if isinstance(v, list):
        return torch.cat([t.reshape(-1) for t in v]).to(torch.float64).unsqueeze(1)
    v = v.to(torch.float64)
    return v.unsqueeze(1) if v.dim() == 1 else v


def _check_solution(x: Tensor, b: Tensor, A: Tensor, x_ref: Tensor, cond: float,
                    solve_rtol: float, what: str) -> None:
    """Relative residual ``‖A x − b‖/‖b‖ ≤ solve_rtol`` and ``‖x − x*‖/‖x*‖ ≤ solve_rtol·κ``."""
    x, b, x_ref = x.cpu(), b.cpu(), x_ref.cpu()
    for j in range(b.shape[1]):
        res = float(torch.linalg.vector_norm(A @ x[:, j] - b[:, j]) /
                    torch.linalg.vector_norm(b[:, j]))
        if not res <= solve_rtol:
            raise AssertionError(
                f"{what}: relative residual ‖(A+λI)x − v‖/‖v‖ = {res:.3g} > {solve_rtol:.3g} "
                f"(column {j})"
            )
        err = float(torch.linalg.vector_norm(x[:, j] - x_ref[:, j]) /
                    torch.linalg.vector_norm(x_ref[:, j]))
        bound = solve_rtol * max(cond, 1.0)
        if not err <= bound:
            raise AssertionError(
                f"{what}: relative error against torch.linalg.solve = {err:.3g} > "
                f"solve_rtol·κ = {bound:.3g} (column {j}, κ = {cond:.3g})"
            )


def assert_operator_matches(
    op: LinearOperator,
    dense: Tensor,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    damping: float | None = None,
    solve_rtol: float = 1e-10,
    generator: torch.Generator | None = None,
) -> None:
    """Assert that ``op`` represents the matrix ``A = dense`` in every part of its contract.

    Checked, with random vectors ``v`` drawn in float64 from ``generator`` (on the CPU) and cast
    to ``op.dtype`` / ``op.device``, in the formats ``(P,)``, ``(P, 3)`` and -- if
    ``op.block_shapes`` is set -- a list of tensors shaped like the blocks:

    * ``op @ v == A v``, returned in the format (shapes, dtype) of ``v``;
    * ``op.to_dense() == A``, ``op.diagonal() == diag(A)``;
    * ``op.to_scipy()``: ``matvec`` / ``matmat`` on numpy float64 equal ``A v``;
    * if ``damping = λ`` is given, with ``A_λ = A + λI`` and ``κ`` its condition number:

      - ``x = op.solve(v, λ)`` has ``‖A_λ x − v‖/‖v‖ ≤ solve_rtol`` per column and
        ``‖x − x*‖/‖x*‖ ≤ solve_rtol·κ`` with ``x* = torch.linalg.solve(A_λ, v)``;
      - the same for ``x = op.inverse(λ) @ v``;
      - ``op.logdet(λ)`` equals ``log|det A_λ|`` from ``torch.linalg.slogdet`` (whose sign must
        be +1) within ``rtol=solve_rtol``, ``atol=solve_rtol·P``.

    Products are compared with ``torch.testing.assert_close`` at
    ``|op − A| ≤ atol + rtol·max|A v| + rtol·|A v|`` elementwise (results cast to float64).

    Args:
        op: the operator under test.
        dense: the ``(P, P)`` ground truth (any float dtype; used in float64).
        rtol: relative tolerance of products / dense / diagonal comparisons.
        atol: absolute tolerance of the same comparisons.
        damping: ``λ ≥ 0`` for the solve / inverse / logdet checks (skipped if ``None``).
        solve_rtol: relative residual bound for solves (float32 operators: about ``1e-5``).
        generator: source of the random vectors (default: a fresh one seeded with 0).

    Raises:
        AssertionError: naming the first part of the contract that disagrees.
    """
    P = op.shape[0]
    A = dense.detach().to(device="cpu", dtype=torch.float64)
    if A.shape != (P, P):
        raise ValueError(f"dense has shape {tuple(A.shape)} but {op.name} has shape {op.shape}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        x = torch.randn(*shape, generator=generator, dtype=torch.float64)
        return x.to(dtype=op.dtype, device=op.device)

    vectors: list = [rand(P), rand(P, K_COLUMNS)]
    if op.block_shapes is not None:
        vectors.append([rand(*s) for s in op.block_shapes])
    fmt_name = {0: "(P,)", 1: f"(P, {K_COLUMNS})", 2: "list"}

    # ---- products
    for i, v in enumerate(vectors):
        what = f"{op.name} @ v [{fmt_name[i]}]"
        out = op @ v
        _check_format(out, v, what, op)
        _close(_flat(out), A @ _flat(v).cpu(), rtol, atol, what)

    # ---- dense, diagonal, scipy
    D = op.to_dense()
    if not isinstance(D, Tensor) or D.shape != (P, P):
        raise AssertionError(f"{op.name}.to_dense(): expected a ({P}, {P}) tensor")
    _close(D, A, rtol, atol, f"{op.name}.to_dense()")
    _close(op.diagonal(), A.diagonal(), rtol, atol, f"{op.name}.diagonal()")
    sp = op.to_scipy()
    vn = _flat(vectors[0]).cpu().numpy()[:, 0]
    Vn = _flat(vectors[1]).cpu().numpy()
    _close(torch.from_numpy(np.asarray(sp.matvec(vn))).reshape(-1),
           A @ torch.from_numpy(vn), rtol, atol, f"{op.name}.to_scipy().matvec")
    _close(torch.from_numpy(np.asarray(sp.matmat(Vn))),
           A @ torch.from_numpy(Vn), rtol, atol, f"{op.name}.to_scipy().matmat")

    if damping is None:
        return

    # ---- solve, inverse, logdet
    lam = float(damping)
    A_lam = A + lam * torch.eye(P, dtype=torch.float64)
    evals = torch.linalg.eigvalsh(A_lam)
    lo, hi = float(evals.abs().min()), float(evals.abs().max())
    cond = hi / lo if lo > 0 else math.inf
    inv = op.inverse(lam)
    for i, v in enumerate(vectors):
        b = _flat(v).cpu()
        x_ref = torch.linalg.solve(A_lam, b)
        what = f"{op.name}.solve(v, {lam}) [{fmt_name[i]}]"
        x = op.solve(v, lam)
        _check_format(x, v, what, op)
        _check_solution(_flat(x), b, A_lam, x_ref, cond, solve_rtol, what)
        what = f"{op.name}.inverse({lam}) @ v [{fmt_name[i]}]"
        x = inv @ v
        _check_format(x, v, what, op)
        _check_solution(_flat(x), b, A_lam, x_ref, cond, solve_rtol, what)

    sign, logabs = torch.linalg.slogdet(A_lam)
    if float(sign) <= 0:
        raise AssertionError(f"dense + {lam}·I is not positive definite (slogdet sign {sign})")
    ld = op.logdet(lam)
    if not isinstance(ld, Tensor) or ld.numel() != 1:
        raise AssertionError(f"{op.name}.logdet({lam}) must return a scalar tensor, got {ld!r}")
    torch.testing.assert_close(
        ld.detach().cpu().to(torch.float64).reshape(()), logabs,
        rtol=solve_rtol, atol=solve_rtol * P,
        msg=lambda m: f"{op.name}.logdet({lam}) vs slogdet: {m}",
    )

"""The extended operator contract against dense float64: per-parameter damping, ``sample``,
``inverse_diagonal``, ``inverse_quad_blocks``, ``eigenvalues``/``logdet_function``; bad input.

Monte Carlo tolerance: with ``S = 40 000`` draws the empirical covariance ``Σ̂`` satisfies
``max|Σ̂ − Σ| ≤ 3e-2 · max diag Σ`` (one entry's standard error is ``≈ √2/√S ≈ 7e-3`` of the
largest variance; the bound allows about 4 of those over ≤ 300 entries).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

import curvkit.linalg.memory as memory_mod
from curvkit.linalg import (
    BlockDiagonal,
    Dense,
    DenseFactor,
    Diagonal,
    Kronecker,
    OuterProductFactor,
    StackedFactor,
    Woodbury,
)
from curvkit.linalg.operator import DampingError

f64 = torch.float64
S_MC, MC_TOL = 40_000, 3e-2


def randn(*shape, seed=0, dtype=f64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _spd(n, rank, seed):
    X = randn(n, rank, seed=seed)
    return X @ X.T


def _layer_factor(seed, N=4, R=2, d_in=3, d_out=2):
    return OuterProductFactor(randn(N, 1, d_in, seed=seed), randn(N * R, 1, d_out, seed=seed + 1))


def make(name):
    """``(operator, dense float64 matrix)`` for each structure."""
    if name == "dense":
        A = _spd(6, 3, 0)
        return Dense(A), A
    if name == "diagonal":
        d = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0, 0.1], dtype=f64)
        return Diagonal(d), torch.diag(d)
    if name == "kronecker":
        A, B = _spd(3, 2, 1), _spd(2, 2, 2)
        return Kronecker(B, A), torch.kron(B, A)
    if name == "kronecker_identity":
        A = _spd(3, 2, 3)
        return Kronecker(None, A, d_out=2), torch.kron(torch.eye(2, dtype=f64), A)
    if name in ("woodbury_dual", "woodbury_primal"):
        f = StackedFactor([_layer_factor(4), _layer_factor(6, d_in=2, d_out=3)])  # P = 12, M = 8
        U = f.dense(f64)
        return Woodbury(f, route=name.split("_")[1]), U @ U.T
    if name == "woodbury_dense":
        U = randn(7, 3, seed=8)
        return Woodbury(DenseFactor(U)), U @ U.T
    if name == "blockdiag":
        (a, A), (b, B) = make("kronecker"), make("woodbury_dense")
        return BlockDiagonal([a, b]), torch.block_diag(A, B)
    if name == "scaled":
        op, A = make("woodbury_dual")
        return 3.0 * op, 3.0 * A
    raise KeyError(name)


ALL = ["dense", "diagonal", "kronecker", "kronecker_identity", "woodbury_dual", "woodbury_primal",
       "woodbury_dense", "blockdiag", "scaled"]
PER_PARAMETER = [n for n in ALL if not n.startswith("kronecker") and n != "blockdiag"]


def _dampings(name, P):
    out = [0.7]
    if name in PER_PARAMETER:
        out.append(torch.linspace(0.3, 1.8, P, dtype=f64))
    return out


@pytest.mark.parametrize("name", ALL)
def test_gaussian_methods_match_dense(name):
    op, A = make(name)
    P = A.shape[0]
    J = randn(P, 6, seed=11)
    for damping in _dampings(name, P):
        D = torch.diag(damping) if isinstance(damping, torch.Tensor) else damping * torch.eye(P, dtype=f64)
        Sigma = torch.linalg.inv(A + D)
        v = randn(P, 2, seed=12)
        torch.testing.assert_close(op.solve(v, damping), Sigma @ v, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(op.logdet(damping), torch.logdet(A + D), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(op.inverse_diagonal(damping), Sigma.diagonal(), rtol=1e-9, atol=1e-11)
        q = op.inverse_quad_blocks(J, 3, damping)
        full = J.T @ Sigma @ J
        torch.testing.assert_close(q, torch.stack([full[:3, :3], full[3:, 3:]]), rtol=1e-9, atol=1e-11)
        x = op.sample(S_MC, damping, torch.Generator().manual_seed(0))
        assert x.shape == (P, S_MC) and x.dtype == op.dtype
        err = float(((x @ x.T) / S_MC - Sigma).abs().max() / Sigma.diagonal().max())
        assert err <= MC_TOL, f"{name}: covariance error {err:.3g}"
    # eigenvalues: log det(A + δI) for every scalar δ from one decomposition
    fn = op.logdet_function()
    for delta in (0.05, 2.0):
        want = torch.logdet(A + delta * torch.eye(P, dtype=f64))
        torch.testing.assert_close(fn(torch.tensor(delta, dtype=f64).log()), want, rtol=1e-10, atol=1e-10)
        ev = op.eigenvalues()
        got = (P - ev.shape[0]) * np.log(delta) + torch.log(ev + delta).sum()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["woodbury_dual", "woodbury_primal", "diagonal", "blockdiag"])
def test_logdet_function_per_group(name):
    op, A = make(name)
    sizes = {"woodbury_dual": [6, 6], "woodbury_primal": [6, 6], "diagonal": [2, 4],
             "blockdiag": [6, 7]}[name]
    t = torch.tensor([0.3, -0.5], dtype=f64, requires_grad=True)
    val = op.logdet_function(sizes)(t)
    d = torch.repeat_interleave(torch.exp(t), torch.tensor(sizes))
    want = torch.logdet(A + torch.diag(d))
    torch.testing.assert_close(val, want, rtol=1e-10, atol=1e-10)
    (g,) = torch.autograd.grad(val, t)
    (g_want,) = torch.autograd.grad(want, t)
    torch.testing.assert_close(g, g_want, rtol=1e-9, atol=1e-10)


def test_per_parameter_damping_errors_are_clear():
    op, _ = make("kronecker")
    bad = torch.linspace(0.5, 1.0, op.shape[0], dtype=f64)
    with pytest.raises(DampingError, match=r"Kronecker: the solve with a per-parameter damping .*"
                                           r"not exact .*structure='full' or 'diag'"):
        op.solve(torch.ones(op.shape[0], dtype=f64), damping=bad)
    assert isinstance(DampingError("x"), TypeError)
    const = torch.full((op.shape[0],), 0.7, dtype=f64)  # constant per block: exact
    torch.testing.assert_close(op.solve(torch.ones(op.shape[0], dtype=f64), const),
                               op.solve(torch.ones(op.shape[0], dtype=f64), 0.7))
    w, _ = make("woodbury_dense")
    with pytest.raises(DampingError, match=r"damping has shape \(3,\).*a float tensor of shape \(7,\)"):
        w.solve(torch.ones(7, dtype=f64), damping=torch.ones(3, dtype=f64))
    with pytest.raises(ValueError, match="damping must be ≥ 0"):
        w.solve(torch.ones(7, dtype=f64), damping=-torch.ones(7, dtype=f64))
    with pytest.raises(ValueError, match="k must be a positive int"):
        w.sample(0, 1.0)


@pytest.mark.parametrize("name", ["dense", "diagonal", "kronecker", "woodbury_dual", "blockdiag"])
def test_solve_rejects_non_finite_right_hand_side(name):
    op, A = make(name)
    for bad in (float("nan"), float("inf")):
        v = torch.ones(A.shape[0], dtype=f64)
        v[1] = bad
        with pytest.raises(ValueError, match="right-hand side of .* has NaN or Inf entries"):
            op.solve(v, 1.0)


@pytest.mark.parametrize("name", ["diagonal", "kronecker", "blockdiag"])
def test_to_dense_memory_check(name, monkeypatch):
    op, _ = make(name)
    monkeypatch.setattr(memory_mod, "available_memory_bytes", lambda device="cpu": 10)
    with pytest.raises(MemoryError, match=r"to_dense\(\) needs .* GB"):
        op.to_dense()
    with pytest.raises(MemoryError, match=r"to_dense\(\) needs .* GB"):
        op.inverse(1.0).to_dense()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_scipy_reports_its_compute_dtype(dtype):
    A = (_spd(40, 40, 5) + 40 * torch.eye(40, dtype=f64))
    op = Dense(A.to(dtype))
    sp = op.to_scipy()
    assert sp.compute_dtype == dtype and sp.eps == torch.finfo(dtype).eps
    b = randn(40, seed=6).numpy()
    x, info = spla.cg(sp, b, rtol=1e-10, maxiter=2000)
    res = np.linalg.norm(A.numpy() @ x - b) / np.linalg.norm(b)  # true residual, float64
    if dtype == torch.float64:
        assert info == 0 and res <= 1e-9
    else:  # products in float32: the true residual stalls near float32 round-off, as reported
        assert 1e-9 < res <= 1e3 * sp.eps

"""The one damped factorisation :func:`curvkit.linalg.damped_cholesky` against dense float64."""

from __future__ import annotations

import warnings

import pytest
import torch

import curvkit.linalg.cholesky as chol_mod
from curvkit.linalg import SingularError, batched_psd_sqrt, batched_spd_solve, damped_cholesky

f64 = torch.float64


def _spd(n: int, rank: int, seed: int = 0, dtype=f64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank, generator=g, dtype=f64)
    return (X @ X.T).to(dtype)


@pytest.mark.parametrize("damping", [0.3, "diag"])
@pytest.mark.parametrize("force_eigh", [False, True])
def test_damped_cholesky_matches_dense(damping, force_eigh, monkeypatch):
    n = 6
    S = _spd(n, 3, dtype=torch.float32)  # rank-deficient float32 input; factorised in float64
    d = torch.linspace(0.2, 1.5, n, dtype=f64) if damping == "diag" else damping
    D = torch.diag(d) if damping == "diag" else damping * torch.eye(n, dtype=f64)
    A = S.double() + D
    if force_eigh:  # Cholesky "fails": the eigendecomposition fallback must give the same numbers
        real = torch.linalg.cholesky_ex
        monkeypatch.setattr(torch.linalg, "cholesky_ex",
                            lambda M: (real(M)[0], torch.ones((), dtype=torch.int32)))
        chol_mod._WARNED.discard("test matrix")
        with pytest.warns(RuntimeWarning, match="test matrix .*Cholesky failed"):
            fac = damped_cholesky(S, d, name="test matrix")
        assert fac.kind == "eigh"
    else:
        fac = damped_cholesky(S, d, name="test matrix")
        assert fac.kind == "chol"
    assert fac.dtype == f64
    Ainv = torch.linalg.inv(A)
    B = torch.randn(n, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fac.solve(B), Ainv @ B, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fac.inverse(), Ainv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fac.logdet(), torch.logdet(A), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fac.inverse_diagonal(), Ainv.diagonal(), rtol=1e-10, atol=1e-12)
    H = fac.half_solve(B)
    torch.testing.assert_close(H.T @ H, B.T @ Ainv @ B, rtol=1e-10, atol=1e-12)
    R = fac.inv_sqrt(torch.eye(n, dtype=f64))
    torch.testing.assert_close(R @ R.T, Ainv, rtol=1e-10, atol=1e-12)


def test_damped_cholesky_does_not_modify_input():
    S = _spd(4, 4)
    before = S.clone()
    damped_cholesky(S, 1.0, symmetrize=False)
    damped_cholesky(S, torch.ones(4, dtype=f64))
    assert torch.equal(S, before)


def test_damped_cholesky_singular_raises():
    S = _spd(5, 2)
    with pytest.raises(SingularError, match=r"rank2 \+ 0.0·I is singular .*pass a larger damping"):
        damped_cholesky(S, 0.0, name="rank2")


def test_damped_cholesky_shift_fallback_warns_once():
    S = torch.ones(3, 3, dtype=f64)  # rank one: Cholesky of S + 0·I fails
    chol_mod._WARNED.discard("ones")
    with pytest.warns(RuntimeWarning, match="trace-scaled shift"):
        fac = damped_cholesky(S, 0.0, name="ones", fallback="shift")
    assert fac.kind == "chol" and 0 < fac.shift < 1e-6
    A = S + fac.shift * torch.eye(3, dtype=f64)
    torch.testing.assert_close(fac.L @ fac.L.T, A, rtol=0, atol=1e-12)  # L Lᵀ = S + τ I
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        damped_cholesky(S, 0.0, name="ones", fallback="shift")  # warned once per name


def test_damped_cholesky_bad_input():
    with pytest.raises(ValueError, match="must be a square matrix"):
        damped_cholesky(torch.ones(2, 3))
    with pytest.raises(ValueError, match="non-finite entries"):
        damped_cholesky(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"scalar or shape \(2,\)"):
        damped_cholesky(torch.eye(2), torch.ones(3))
    with pytest.raises(ValueError, match="fallback must be one of"):
        damped_cholesky(torch.eye(2), fallback="jitter")


def test_batched_psd_sqrt_squares_back():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(4, 3, 2, generator=g, dtype=f64)
    S = X @ X.transpose(1, 2)  # rank-deficient PSD batch
    R = batched_psd_sqrt(S)
    torch.testing.assert_close(R, R.transpose(1, 2), rtol=0, atol=1e-14)
    torch.testing.assert_close(R @ R, S, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"batch of square matrices \(B, n, n\), got shape \(3, 3\)"):
        batched_psd_sqrt(S[0])


def test_batched_spd_solve_matches_dense():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(5, 3, 3, generator=g, dtype=f64)
    S = X @ X.transpose(1, 2) + torch.eye(3, dtype=f64)
    b = torch.randn(5, 3, 2, generator=g, dtype=f64)
    sol, logdet = batched_spd_solve(S.float(), b.float())
    assert sol.dtype == logdet.dtype == f64
    ref_sol = torch.stack([torch.linalg.solve(S[i].float().double(), b[i].float().double())
                           for i in range(5)])
    torch.testing.assert_close(sol, ref_sol, rtol=1e-10, atol=0)
    torch.testing.assert_close(logdet, torch.logdet(S.float().double()), rtol=1e-12, atol=0)
    S_bad = S.clone()
    S_bad[2] = -S_bad[2]
    with pytest.raises(SingularError, match="my cov 2 of the batch is not positive definite"):
        batched_spd_solve(S_bad, b, name="my cov")
    with pytest.raises(ValueError, match=r"my cov: expected S \(K, n, n\) and B \(K, n, k\)"):
        batched_spd_solve(S, b[:2], name="my cov")

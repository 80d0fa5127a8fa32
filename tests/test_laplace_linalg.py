"""Dense float64 tests of the Laplace algebra: :class:`~curvkit.linalg.Woodbury` with a diagonal
damping (``Λ = diag(δ) + J Jᵀ``), the float64 Gram methods of the factors, the softmax rank reduction.

Ground truths are explicit matrices: ``Λ = diag(δ) + J Jᵀ`` formed from an explicit ``J`` (built
column by column from per-sample outer products), inverted with ``torch.linalg``.

Monte Carlo tolerance (stated once): with ``S = 10⁵`` samples the empirical covariance ``Σ̂``
satisfies ``max|Σ̂ − Λ⁻¹| ≤ 2e-2 · max diag(Λ⁻¹)`` (the standard error of one entry is about
``√2/√S ≈ 4.5e-3`` of the largest variance; the bound allows 4–5 of those over ≤ 2000 entries).
"""

from __future__ import annotations

import pytest
import torch

import curvkit.linalg.memory as memory_mod
from curvkit.curvature.fisher import reduce_softmax_errors, softmax_null_basis
from curvkit.linalg import DenseFactor, OuterProductFactor, ScaledFactor, StackedFactor, Woodbury
from curvkit.linalg.outer import colmajor
from curvkit.testing import assert_operator_matches

GemmOuterFactor = OuterProductFactor  # the one dense-layer product path


def gram64(f):
    return f.gram64()


def cross_gram64(f, g):
    return f.cross_gram64(g)


def block_grams64(f, R):
    return f.block_grams64(R)


def dense_columns(f):
    return f.dense()

f64 = torch.float64
MC_SAMPLES = 100_000
MC_TOL = 2e-2


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


def explicit_U(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``(P, M)``: column ``m = (n, r)`` is ``vec_r(Σ_t e_{mt} a_{nt}ᵀ)`` (loops)."""
    N, T, d_in = a.shape
    M, _, d_out = e.shape
    R = M // N
    cols = []
    for m in range(M):
        G = torch.zeros(d_out, d_in, dtype=f64)
        for t in range(T):
            G += torch.outer(e[m, t], a[m // R, t])
        cols.append(G.reshape(-1))
    return torch.stack(cols, dim=1)


def layer_factors(T: int = 1, R: int = 3, seed: int = 0):
    """Two stacked layer factors sharing ``M = N·R`` columns, and the explicit ``J``."""
    N = 4
    shapes = [(5, 3), (3, 2)]
    facs, Us = [], []
    for i, (d_in, d_out) in enumerate(shapes):
        a, e = randn(N, T, d_in, seed=seed + 2 * i), randn(N * R, T, d_out, seed=seed + 2 * i + 1)
        facs.append(GemmOuterFactor(a, e))
        Us.append(explicit_U(a, e))
    return facs, torch.cat(Us, dim=0)


def mc_covariance_error(samples: torch.Tensor, cov: torch.Tensor) -> float:
    """``max|Σ̂ − Σ| / max diag Σ`` for zero-mean samples ``(P, S)``."""
    emp = samples @ samples.T / samples.shape[1]
    return float((emp - cov).abs().max() / cov.diagonal().max())


# ====================================================================== helpers of the factors
@pytest.mark.parametrize("R", [1, 3])
def test_gemm_outer_factor_matches_outer_product_factor(R):
    a, e = randn(6, 1, 4, seed=1), randn(6 * R, 1, 3, seed=2)
    ref, fast = OuterProductFactor(a, e), GemmOuterFactor(a, e)
    U = explicit_U(a, e)
    X, W = randn(12, 5, seed=3), randn(6 * R, 5, seed=4)
    for Xin in (X, colmajor(X)):
        torch.testing.assert_close(fast.rmatmat(Xin), U.T @ X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.matmat(W), ref.matmat(W), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.matmat(W), U @ W, rtol=1e-12, atol=1e-12)
    assert colmajor(X).stride(0) == 1


@pytest.mark.parametrize("T", [1, 3])
def test_gram_cross_gram_and_block_grams_against_explicit(T):
    facs, U = layer_factors(T=T, R=3)
    V = StackedFactor(facs)
    torch.testing.assert_close(gram64(V).tril(), (U.T @ U).tril(), rtol=1e-12, atol=1e-12)
    facs2, U2 = layer_factors(T=T, R=3, seed=10)
    torch.testing.assert_close(cross_gram64(V, StackedFactor(facs2)), U.T @ U2, rtol=1e-12, atol=1e-12)
    blocks = block_grams64(StackedFactor(facs2), 3)
    G = U2.T @ U2
    for n in range(blocks.shape[0]):
        torch.testing.assert_close(blocks[n], G[3 * n:3 * n + 3, 3 * n:3 * n + 3])
    torch.testing.assert_close(dense_columns(V), U)
    S = ScaledFactor(DenseFactor(U), 0.5)
    torch.testing.assert_close(dense_columns(S), 0.5 * U)
    torch.testing.assert_close(gram64(S), 0.25 * U.T @ U)


def test_softmax_null_basis_is_orthonormal_and_orthogonal_to_sqrt_p():
    p = torch.softmax(randn(7, 5, seed=2) * 3, dim=1)
    p[0] = torch.tensor([1.0, 0, 0, 0, 0], dtype=f64)  # a saturated prediction
    Q = softmax_null_basis(p)
    assert Q.shape == (7, 5, 4)
    eye = torch.eye(4, dtype=f64).expand(7, 4, 4)
    torch.testing.assert_close(Q.transpose(1, 2) @ Q, eye, rtol=0, atol=1e-14)
    torch.testing.assert_close(Q.transpose(1, 2) @ p.sqrt()[:, :, None],
                               torch.zeros(7, 4, 1, dtype=f64), rtol=0, atol=1e-14)


def test_reduce_softmax_errors_keeps_g_gt():
    """``S_n`` rows ``√p_c (p − 1_c)``: ``C`` columns per input and ``C − 1`` give the same ``GGᵀ``."""
    N, C, d_in, d_out = 5, 4, 3, 6
    p = torch.softmax(randn(N, C, seed=5), dim=1)
    S = p.sqrt()[:, :, None] * (p[:, None, :] - torch.eye(C, dtype=f64))  # (N, C, C)
    D = randn(N, C, d_out, seed=6)  # ∂f/∂s per input (any map from logits to layer outputs)
    e = torch.einsum("ncq,nqo->nco", S, D).reshape(N * C, 1, d_out)
    a = randn(N, 1, d_in, seed=7)
    e_red = reduce_softmax_errors(e, p)
    assert e_red.shape == (N * (C - 1), 1, d_out)
    U, U_red = explicit_U(a, e), explicit_U(a, e_red)
    torch.testing.assert_close(U_red @ U_red.T, U @ U.T, rtol=1e-12, atol=1e-13)


# ====================================================================== Woodbury with diagonal damping
@pytest.mark.parametrize("route", ["dual", "primal"])
@pytest.mark.parametrize("T", [1, 3])
def test_diagonal_plus_low_rank_against_dense(route, T):
    facs, J = layer_factors(T=T, R=2)
    P = J.shape[0]
    delta = 0.3 + torch.rand(P, generator=torch.Generator().manual_seed(3), dtype=f64)
    Lam = torch.diag(delta) + J @ J.T
    op = Woodbury(StackedFactor(facs), route=route)
    assert op.route == route
    assert_operator_matches(op, J @ J.T, damping=0.5, solve_rtol=1e-10)
    Linv = torch.linalg.inv(Lam)
    v = randn(P, 3, seed=9)
    torch.testing.assert_close(op.solve(v, delta), Linv @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.inverse_diagonal(delta), Linv.diagonal(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.logdet(delta), torch.logdet(Lam), rtol=1e-12, atol=1e-10)
    # quadratic forms of test columns, two groups of R = 3
    Jt = randn(P, 6, seed=8)
    blocks = op.inverse_quad_blocks(DenseFactor(Jt), 3, delta)
    ref = Jt.T @ Linv @ Jt
    torch.testing.assert_close(blocks[0], ref[:3, :3], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(blocks[1], ref[3:, 3:], rtol=1e-10, atol=1e-12)
    # exact sampling: empirical covariance of 10⁵ draws (tolerance in the module doc)
    x = op.sample(MC_SAMPLES, delta, torch.Generator().manual_seed(0))
    assert x.shape == (P, MC_SAMPLES)
    assert mc_covariance_error(x, Linv) <= MC_TOL


def test_sampling_is_reproducible_and_only_uses_the_generator():
    facs, J = layer_factors()
    delta = torch.full((J.shape[0],), 2.0, dtype=f64)
    op = Woodbury(DenseFactor(J))
    for damping in (delta, 2.0):
        torch.manual_seed(123)
        a = op.sample(7, damping, torch.Generator().manual_seed(1))
        torch.manual_seed(456)
        b = op.sample(7, damping, torch.Generator().manual_seed(1))
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_route_auto_picks_cheaper_route():
    J_tall = randn(40, 6, seed=1)  # P > M: dual
    J_wide = randn(6, 40, seed=2)  # P < M: primal
    assert Woodbury(DenseFactor(J_tall), route="cost").route == "dual"
    assert Woodbury(DenseFactor(J_wide), route="cost").route == "primal"


def test_route_memory_error_states_gigabytes(monkeypatch):
    monkeypatch.setattr(memory_mod, "available_memory_bytes", lambda device="cpu": 10)
    import curvkit.linalg.woodbury as woodbury_mod

    monkeypatch.setattr(woodbury_mod, "available_memory_bytes", lambda device="cpu": 10)
    with pytest.raises(MemoryError, match=r"GB.*structure='kfac'"):
        Woodbury(DenseFactor(randn(40, 6)), route="cost")


def test_bad_delta_is_rejected():
    op = Woodbury(DenseFactor(randn(5, 2)))
    with pytest.raises(ValueError, match="must be > 0 everywhere"):
        op.solve(randn(5), torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], dtype=f64))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        op.solve(randn(5), torch.ones(4, dtype=f64))
    with pytest.raises(ValueError, match="damping must be ≥ 0"):
        op.solve(randn(5), -torch.ones(5, dtype=f64))

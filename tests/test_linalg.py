"""Dense float64 tests of every ``curvkit.linalg`` operator against matrices built another way.

Ground truths are built without the code under test: ``U`` column by column from explicit
per-sample outer products, ``torch.block_diag``, ``torch.diag``, ``torch.linalg``, and Fisher
matrices from ``curvkit.testing.dense`` (``torch.func``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import curvkit.linalg.outer as outer_mod
from curvkit.linalg import (
    BlockDiagonal,
    Dense,
    DenseFactor,
    Diagonal,
    InverseOperator,
    LinearOperator,
    OuterProductFactor,
    SingularError,
    StackedFactor,
    Woodbury,
    check_memory,
)
from curvkit.testing import (
    assert_operator_matches,
    dense_block_diagonal,
    dense_fisher,
    output_fisher,
    per_sample_jacobians,
    per_sample_loss_gradients,
)

f64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = f64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=f64).to(dtype)


def explicit_U(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``(P, M)`` with column ``m = (n, r)`` equal to ``vec_r(Σ_t e_{mt} a_{n t}ᵀ)`` (loops)."""
    N, T, d_in = a.shape
    M, _, d_out = e.shape
    R = M // N
    cols = []
    for m in range(M):
        n = m // R
        G = torch.zeros(d_out, d_in, dtype=e.dtype)
        for t in range(T):
            G += torch.outer(e[m, t], a[n, t])
        cols.append(G.reshape(-1))
    return torch.stack(cols, dim=1)


# ====================================================================== Woodbury(DenseFactor)
@pytest.mark.parametrize("route", ["dual", "primal", "auto"])
def test_woodbury_dense_factor_low_rank(route):
    U = randn(12, 5, seed=1)
    op = Woodbury(DenseFactor(U), route=route)
    assert op.route == ("dual" if route == "auto" else route)
    assert_operator_matches(op, U @ U.T, damping=0.3)
    assert_operator_matches(op, U @ U.T, damping=1e-3, solve_rtol=1e-9)


@pytest.mark.parametrize("route", ["dual", "primal"])
def test_woodbury_dense_factor_wide(route):
    U = randn(6, 10, seed=2)  # P < M: U Uᵀ is full rank
    op = Woodbury(DenseFactor(U), route=route)
    assert_operator_matches(op, U @ U.T, damping=0.7)


def test_woodbury_primal_full_rank_allows_zero_damping():
    U = randn(6, 10, seed=2)
    A = U @ U.T
    op = Woodbury(DenseFactor(U))
    assert op.route == "primal"
    assert_operator_matches(op, A, damping=0.0, solve_rtol=1e-9)
    v = randn(6, seed=3)
    torch.testing.assert_close(op.solve(v, 0.0), torch.linalg.solve(A, v))


def test_woodbury_dual_and_primal_agree():
    U = randn(8, 8, seed=4)
    v = randn(8, 2, seed=5)
    dual, primal = Woodbury(DenseFactor(U), "dual"), Woodbury(DenseFactor(U), "primal")
    for lam in (1e-2, 1.0, 10.0):
        torch.testing.assert_close(dual.solve(v, lam), primal.solve(v, lam), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(dual.logdet(lam), primal.logdet(lam), rtol=1e-11, atol=1e-11)


def test_woodbury_logdet_identity():
    U = randn(9, 4, seed=6)
    lam = 0.5
    op = Woodbury(DenseFactor(U), "dual")
    K = U.T @ U
    expected = (9 - 4) * math.log(lam) + torch.logdet(lam * torch.eye(4, dtype=f64) + K)
    torch.testing.assert_close(op.logdet(lam), expected)
    torch.testing.assert_close(op.gram(), K)


# ====================================================================== OuterProductFactor
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("R", [1, 3])
def test_outer_product_factor_against_explicit_U(T, R):
    N, d_in, d_out = 5, 4, 3
    a, e = randn(N, T, d_in, seed=7), randn(N * R, T, d_out, seed=8)
    U = explicit_U(a, e)
    grams = {}
    for route in ("hadamard", "per_sample"):
        fac = OuterProductFactor(a, e, gram_route=route)
        assert (fac.size, fac.rank) == (d_out * d_in, N * R)
        grams[route] = fac.gram()
        torch.testing.assert_close(grams[route], U.T @ U, rtol=1e-12, atol=1e-12)
        X, W = randn(fac.size, 2, seed=9), randn(fac.rank, 2, seed=10)
        torch.testing.assert_close(fac.rmatmat(X), U.T @ X, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fac.matmat(W), U @ W, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fac.sq_row_norms(), (U**2).sum(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fac.per_sample_gradients().reshape(fac.rank, -1), U.T)
    torch.testing.assert_close(grams["hadamard"], grams["per_sample"], rtol=1e-12, atol=1e-12)
    auto = OuterProductFactor(a, e)
    assert auto.gram_route in ("hadamard", "per_sample")
    if T == 1:
        assert auto.gram_route == "hadamard"
    op = Woodbury(auto, "dual", block_shapes=[(d_out, d_in)])
    assert_operator_matches(op, U @ U.T, damping=0.2)


def test_outer_product_factor_chunked_paths(monkeypatch):
    """Tiny chunk budget: the location Gram and sq_row_norms loop over many input chunks."""
    monkeypatch.setattr(outer_mod, "CHUNK_BYTES", 64)
    N, T, R, d_in, d_out = 7, 3, 2, 3, 2
    a, e = randn(N, T, d_in, seed=11), randn(N * R, T, d_out, seed=12)
    U = explicit_U(a, e)
    fac = OuterProductFactor(a, e, gram_route="hadamard")
    torch.testing.assert_close(fac.gram(), U.T @ U, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fac.sq_row_norms(), (U**2).sum(1), rtol=1e-12, atol=1e-12)


def test_conv_layer_fisher_matches_torch_func():
    """A real Conv2d (T = 4 locations), regression: exact Fisher = (1/N) Σ_n J_nᵀ J_n."""
    torch.manual_seed(0)
    N, C_in, C_out, H, k = 2, 2, 3, 4, 3
    conv = nn.Conv2d(C_in, C_out, k, bias=False).double()
    model = nn.Sequential(conv, nn.Flatten())
    x = randn(N, C_in, H, H, seed=13)
    patches = nn.functional.unfold(x, k).transpose(1, 2)  # (N, T, C_in k k)
    T = patches.shape[1]
    # exact regression Fisher: one unit seed per output (o, t), scaled by 1/√N
    R = C_out * T
    e = torch.zeros(N, C_out, T, T, C_out, dtype=f64)  # (n, o', t', t, o)
    for o in range(C_out):
        for t in range(T):
            e[:, o, t, t, o] = 1 / math.sqrt(N)
    e = e.reshape(N * R, T, C_out)
    fac = OuterProductFactor(patches, e)
    op = Woodbury(fac, block_shapes=[conv.weight.shape])
    F = dense_fisher(model, x, likelihood="regression")
    J = per_sample_jacobians(model, x)
    torch.testing.assert_close(F, torch.einsum("ncp,ncq->pq", J, J) / N)
    assert_operator_matches(op, F, damping=0.1)


# ====================================================================== full Fisher of an MLP
def _mlp(d0=4, d1=5, C=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d0, d1, bias=False), nn.Tanh(),
                         nn.Linear(d1, C, bias=False)).double()


def _mlp_factors(model, x, seeds_at_logits):
    """Per-layer factors from a manual forward/backward; ``seeds`` ``(N, R, C)`` at the logits."""
    W1, W2 = model[0].weight.detach(), model[2].weight.detach()
    N, R, C = seeds_at_logits.shape
    a2 = torch.tanh(x @ W1.T)
    e2 = seeds_at_logits.reshape(N * R, C)
    e1 = (e2 @ W2) * (1 - a2**2).repeat_interleave(R, 0)
    return [OuterProductFactor(x[:, None, :], e1[:, None, :]),
            OuterProductFactor(a2[:, None, :], e2[:, None, :])]


def test_stacked_factor_full_fisher_two_layers():
    model = _mlp()
    N, C = 6, 3
    x = randn(N, 4, seed=14)
    p = torch.softmax(model(x).detach(), 1)
    eye = torch.eye(C, dtype=f64)
    # exact: seed (n, c) = √p_{nc} (1_c − p_n) / √N
    seeds = p.sqrt()[:, :, None] * (eye[None] - p[:, None, :]) / math.sqrt(N)
    facs = _mlp_factors(model, x, seeds)
    shapes = [model[0].weight.shape, model[2].weight.shape]
    stacked = StackedFactor(facs)
    U = torch.cat([explicit_U(f.a, f.e) for f in facs], dim=0)
    torch.testing.assert_close(stacked.gram(), U.T @ U)
    torch.testing.assert_close(stacked.sq_row_norms(), (U**2).sum(1))
    F = dense_fisher(model, x, kind="exact")
    torch.testing.assert_close(U @ U.T, F, rtol=1e-10, atol=1e-12)
    op = Woodbury(stacked, "dual", block_shapes=shapes)
    assert_operator_matches(op, F, damping=1e-2)
    assert_operator_matches(op, F, damping=10.0)
    # block-diagonal: one Woodbury per layer
    bd = BlockDiagonal([Woodbury(f, "dual") for f in facs], block_shapes=shapes)
    F_bd = dense_block_diagonal(F, [s.numel() for s in shapes])
    assert_operator_matches(bd, F_bd, damping=1e-2)


def test_stacked_factor_empirical_and_mc_fisher():
    model = _mlp(seed=1)
    N, C, S = 5, 3, 4
    x = randn(N, 4, seed=15)
    p = torch.softmax(model(x).detach(), 1)
    eye = torch.eye(C, dtype=f64)
    y = torch.randint(0, C, (N,), generator=gen(16))
    seeds = ((p - eye[y]) / math.sqrt(N))[:, None, :]
    op = Woodbury(StackedFactor(_mlp_factors(model, x, seeds)))
    assert_operator_matches(op, dense_fisher(model, x, y, kind="empirical"), damping=0.05)
    y_hat = torch.multinomial(p, S, replacement=True, generator=gen(17))  # (N, S)
    seeds = (p[:, None, :] - eye[y_hat]) / math.sqrt(N * S)  # column m = n·S + s
    op = Woodbury(StackedFactor(_mlp_factors(model, x, seeds)))
    assert_operator_matches(op, dense_fisher(model, x, y_hat.T, kind="mc"), damping=0.05)


def test_woodbury_over_stacked_conv_like_factors():
    N, R = 4, 2
    f1 = OuterProductFactor(randn(N, 5, 3, seed=18), randn(N * R, 5, 2, seed=19))
    f2 = OuterProductFactor(randn(N, 1, 4, seed=20), randn(N * R, 1, 3, seed=21))
    U = torch.cat([explicit_U(f1.a, f1.e), explicit_U(f2.a, f2.e)], dim=0)
    op = Woodbury(StackedFactor([f1, f2]), block_shapes=[(2, 3), (3, 4)])
    assert op.route == "dual"
    assert_operator_matches(op, U @ U.T, damping=1e-3, solve_rtol=1e-10)
    assert_operator_matches(op, U @ U.T, damping=3.0)
    # inverse operator: its logdet is minus the damped one, and it solves back
    inv = op.inverse(0.5)
    assert isinstance(inv, InverseOperator)
    A = U @ U.T + 0.5 * torch.eye(U.shape[0], dtype=f64)
    torch.testing.assert_close(inv.logdet(), -torch.logdet(A))
    torch.testing.assert_close(inv.to_dense(), torch.linalg.inv(A), rtol=1e-9, atol=1e-11)
    v = randn(U.shape[0], seed=22)
    torch.testing.assert_close(inv.solve(v), A @ v)


# ====================================================================== simple operators
def test_diagonal_operator():
    d = randn(7, seed=23).abs() + 0.1
    op = Diagonal(d, block_shapes=[(3,), (2, 2)])
    assert_operator_matches(op, torch.diag(d), damping=0.0)
    assert_operator_matches(op, torch.diag(d), damping=0.4)


def test_dense_operator():
    B = randn(6, 6, seed=24)
    A = B @ B.T
    op = Dense(A, block_shapes=[(2, 2), (2,)])
    assert_operator_matches(op, A, damping=0.2)
    assert_operator_matches(op, A, damping=0.0, solve_rtol=1e-8)


def test_block_diagonal_of_mixed_operators():
    U = randn(5, 2, seed=25)
    B = randn(3, 3, seed=26)
    d = randn(4, seed=27).abs()
    blocks = [Woodbury(DenseFactor(U)), Dense(B @ B.T), Diagonal(d)]
    op = BlockDiagonal(blocks, block_shapes=[(5,), (3,), (2, 2)])
    A = torch.block_diag(U @ U.T, B @ B.T, torch.diag(d))
    assert_operator_matches(op, A, damping=0.3)
    torch.testing.assert_close(op.to_dense(), A)
    with pytest.raises(SingularError, match="rank-deficient"):
        op.solve(randn(12), 0.0)


def test_scalar_multiple_and_sum():
    U = randn(8, 3, seed=28)
    d = randn(8, seed=29).abs() + 0.5
    W, D = Woodbury(DenseFactor(U)), Diagonal(d)
    for c in (2.5, 0.0):
        assert_operator_matches(c * W, c * (U @ U.T), damping=0.7)
        assert_operator_matches(W * c, c * (U @ U.T), damping=0.7)
    s = W + D
    A = U @ U.T + torch.diag(d)
    assert_operator_matches(s, A)  # _Sum has no factorised solve
    torch.testing.assert_close(s.logdet(0.1), torch.logdet(A + 0.1 * torch.eye(8, dtype=f64)))
    torch.testing.assert_close(s.logdet(0.0), torch.logdet(A))
    with pytest.raises(NotImplementedError, match="no solve"):
        s.solve(randn(8), 0.1)
    # operator @ operator composes
    torch.testing.assert_close((W @ D).to_dense(), (U @ U.T) @ torch.diag(d))


def test_scaled_and_summed_rank_deficient_reject_zero_damping():
    U = randn(6, 2, seed=30)
    W = Woodbury(DenseFactor(U))
    for op in (2.0 * W, 0.0 * W, W + W):
        with pytest.raises(SingularError, match="rank-deficient"):
            op.logdet(0.0)
    with pytest.raises(SingularError, match="rank-deficient"):
        (2.0 * W).solve(randn(6), 0.0)


def test_float32_operator_solves():
    N, R = 6, 2
    a1, e1 = randn(N, 1, 5, seed=31), randn(N * R, 1, 4, seed=32)
    a2, e2 = randn(N, 3, 3, seed=33), randn(N * R, 3, 2, seed=34)
    U = torch.cat([explicit_U(a1, e1), explicit_U(a2, e2)], dim=0)
    facs = [OuterProductFactor(a.float(), e.float()) for a, e in ((a1, e1), (a2, e2))]
    op = Woodbury(StackedFactor(facs), block_shapes=[(4, 5), (2, 3)])
    assert op.dtype == torch.float32
    # the relative residual of a float32 solution grows like eps32·κ; κ(A + 2I) ≈ 50
    assert_operator_matches(op, U @ U.T, rtol=1e-5, atol=1e-6, damping=2.0, solve_rtol=1e-5)
    for lam in (0.1, 0.5):  # κ up to ≈ 1000: the solution itself stays accurate to ~1e-6
        v = randn(26, 4, seed=35)
        x = op.solve(v.float(), lam)
        assert x.dtype == torch.float32
        x_ref = torch.linalg.solve(U @ U.T + lam * torch.eye(26, dtype=f64), v)
        assert float((x.double() - x_ref).norm() / x_ref.norm()) < 1e-5
        ld = torch.logdet(U @ U.T + lam * torch.eye(26, dtype=f64))
        torch.testing.assert_close(op.logdet(lam), ld, rtol=1e-5, atol=1e-5)


# ====================================================================== bad input
def _ops():
    U = randn(6, 2, seed=36)
    return Woodbury(DenseFactor(U), block_shapes=[(2, 2), (2,)]), Dense(U @ U.T + torch.eye(6,
                                                                                        dtype=f64))


BAD_INPUTS = [
    ("negative damping", lambda W, D: W.solve(randn(6), -1.0), ValueError,
     r"damping must be ≥ 0, got -1\.0"),
    ("negative damping inverse", lambda W, D: D.inverse(-0.1), ValueError, "damping must be ≥ 0"),
    ("negative damping logdet", lambda W, D: D.logdet(-0.1), ValueError, "damping must be ≥ 0"),
    ("nan damping", lambda W, D: D.solve(randn(6), float("nan")), ValueError,
     "damping must be a finite number"),
    ("zero damping rank-deficient", lambda W, D: W.solve(randn(6), 0.0), SingularError,
     r"rank-deficient \(rank ≤ 2 < P = 6\).*pass damping > 0"),
    ("zero damping inverse", lambda W, D: W.inverse(0.0), SingularError, "rank-deficient"),
    ("zero damping logdet", lambda W, D: W.logdet(0.0), SingularError, "rank-deficient"),
    ("wrong vector shape", lambda W, D: W @ randn(5), ValueError,
     r"v has shape \(5,\); Woodbury of shape \(6, 6\) accepts \(6,\), \(6, k\)"),
    ("wrong matrix shape", lambda W, D: W.solve(randn(6, 2, 1), 1.0), ValueError,
     r"has shape \(6, 2, 1\)"),
    ("wrong dtype", lambda W, D: W @ randn(6, dtype=torch.float32), TypeError,
     "v has dtype torch.float32 but Woodbury works in torch.float64"),
    ("not a tensor", lambda W, D: W.solve(3.0, 1.0), TypeError,
     "v must be a Tensor or a list of Tensors, got float"),
    ("list wrong number", lambda W, D: W @ [randn(2, 2)], ValueError,
     r"v has 1 tensors but Woodbury expects 2 shaped \[\(2, 2\), \(2,\)\]"),
    ("list wrong shape", lambda W, D: W.solve([randn(2, 2), randn(3)], 1.0), ValueError,
     r"v\[1\] has shape \(3,\), expected \(2,\)"),
    ("list wrong dtype", lambda W, D: W @ [randn(2, 2), randn(2, dtype=torch.float32)],
     TypeError, r"v\[1\] has dtype torch.float32"),
    ("list without block shapes", lambda W, D: D @ [randn(6)], TypeError,
     r"Dense has no block shapes; pass a flat tensor of shape \(6,\)"),
    ("unknown damping mode", lambda W, D: W.solve(randn(6), 1.0, damping_mode="heuristic"),
     ValueError, r"damping_mode='heuristic' is not available for Woodbury; it supports \['exact'\]"),
    ("unknown damping mode inverse", lambda W, D: D.inverse(1.0, damping_mode="foo"), ValueError,
     r"supports \['exact'\]"),
    ("negative scaling", lambda W, D: -1.0 * W, ValueError, "scaling must be ≥ 0"),
    ("sum of different shapes", lambda W, D: W + Diagonal(torch.ones(3, dtype=f64)), ValueError,
     r"cannot add operators of shapes \(6, 6\) and \(3, 3\)"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(call, exc, match):
    W, D = _ops()
    with pytest.raises(exc, match=match):
        call(W, D)


def test_bad_construction():
    with pytest.raises(ValueError, match="U must be 2-D"):
        DenseFactor(randn(3))
    with pytest.raises(ValueError, match="route must be 'auto', 'dual' or 'primal'"):
        Woodbury(DenseFactor(randn(3, 2)), route="svd")
    with pytest.raises(ValueError, match=r"all blocks must share the number of columns M, got \[2, 3\]"):
        StackedFactor([DenseFactor(randn(3, 2)), DenseFactor(randn(3, 3))])
    with pytest.raises(ValueError, match="at least one block"):
        StackedFactor([])
    with pytest.raises(ValueError, match="incompatible a"):
        OuterProductFactor(randn(2, 1, 3), randn(3, 1, 2))
    with pytest.raises(ValueError, match="must be 3-D"):
        OuterProductFactor(randn(2, 3), randn(2, 2))
    with pytest.raises(ValueError, match="gram_route must be"):
        OuterProductFactor(randn(2, 1, 3), randn(2, 1, 2), gram_route="fast")
    with pytest.raises(ValueError, match="block_shapes hold 5 entries but the operator is 6×6"):
        Dense(torch.eye(6, dtype=f64), block_shapes=[(5,)])
    with pytest.raises(ValueError, match="A must be square"):
        Dense(randn(3, 2))
    with pytest.raises(ValueError, match="diagonal must be 1-D"):
        Diagonal(randn(3, 2))
    with pytest.raises(ValueError, match="BlockDiagonal needs at least one block"):
        BlockDiagonal([])


def test_non_finite_inputs():
    U = randn(6, 2, seed=37)
    U[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="Gram matrix has non-finite entries"):
        Woodbury(DenseFactor(U), "dual").solve(randn(6), 1.0)
    with pytest.raises(FloatingPointError, match="factor has non-finite entries"):
        Woodbury(DenseFactor(U), "primal").logdet(1.0)
    a, e = randn(3, 1, 2), randn(3, 1, 2)
    e[1, 0, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        Woodbury(OuterProductFactor(a, e)).solve(randn(4), 1.0)
    with pytest.raises(FloatingPointError, match="Dense: the matrix has non-finite entries"):
        Dense(torch.full((2, 2), float("inf"), dtype=f64))
    with pytest.raises(FloatingPointError, match="Diagonal: the diagonal has non-finite entries"):
        Diagonal(torch.tensor([1.0, float("nan")], dtype=f64))


def test_check_memory_absurd_request():
    with pytest.raises(MemoryError, match=r"needs 1000000\.00 GB but only .* GB is available"):
        check_memory(10**15, "an absurd Gram")
    check_memory(1024, "a small buffer")  # fits


def test_dense_singular_raises_on_zero_damping():
    op = Dense(torch.diag(torch.tensor([1.0, 0.0], dtype=f64)))
    with pytest.raises(SingularError, match=r"Dense \+ 0\.0·I is singular"):
        op.solve(torch.ones(2, dtype=f64), 0.0)


def test_base_operator_without_solve():
    class Sym(LinearOperator):
        def __init__(self, A):
            super().__init__(A.shape[0], A.dtype, A.device)
            self.A = A

        def _matmat(self, X):
            return self.A @ X

    A = torch.eye(3, dtype=f64) * 2
    op = Sym(A)
    assert_operator_matches(op, A)
    torch.testing.assert_close(op.logdet(1.0), torch.tensor(3 * math.log(3.0), dtype=f64))
    with pytest.raises(NotImplementedError, match="Sym has no solve"):
        op.solve(torch.ones(3, dtype=f64), 1.0)


# ====================================================================== the checker itself
def test_assert_operator_matches_detects_mismatch():
    U = randn(6, 2, seed=38)
    op = Woodbury(DenseFactor(U))
    wrong = U @ U.T
    wrong[0, 1] += 1e-6
    with pytest.raises(AssertionError, match=r"Woodbury @ v \[\(P,\)\]"):
        assert_operator_matches(op, wrong)

    class BadSolve(Dense):
        def _solve(self, X, damping, damping_mode):
            return 1.001 * super()._solve(X, damping, damping_mode)

    A = U @ U.T + torch.eye(6, dtype=f64)
    with pytest.raises(AssertionError, match="relative residual"):
        assert_operator_matches(BadSolve(A), A, damping=0.1)
    with pytest.raises(ValueError, match="dense has shape"):
        assert_operator_matches(op, torch.eye(5, dtype=f64))


# ====================================================================== dense ground truth helpers
def test_per_sample_jacobians_of_linear_model():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x = randn(4, 3, seed=39)
    J = per_sample_jacobians(lin, x)
    eye = torch.eye(2, dtype=f64)
    expected = torch.stack([torch.cat([torch.kron(eye, xn[None, :]), eye], dim=1) for xn in x])
    torch.testing.assert_close(J, expected)
    # a subset of parameters, in a different order: bias first
    J_b = per_sample_jacobians(lin, x, [lin.bias, lin.weight])
    torch.testing.assert_close(J_b, torch.cat([expected[..., 6:], expected[..., :6]], dim=2))


@pytest.mark.parametrize("likelihood", ["classification", "binary", "regression"])
def test_output_fisher_is_expected_outer_product(likelihood):
    f = randn(3, 2, seed=40)
    Lam = output_fisher(f, likelihood)
    expected = torch.zeros(3, 2, 2, dtype=f64)
    for n in range(3):
        if likelihood == "classification":
            p = torch.softmax(f[n], 0)
            for c in range(2):
                r = p - torch.eye(2, dtype=f64)[c]
                expected[n] += p[c] * torch.outer(r, r)
        elif likelihood == "binary":
            s = torch.sigmoid(f[n])
            for y0 in (0.0, 1.0):
                for y1 in (0.0, 1.0):
                    y = torch.tensor([y0, y1], dtype=f64)
                    prob = torch.prod(torch.where(y == 1, s, 1 - s))
                    expected[n] += prob * torch.outer(s - y, s - y)
        else:
            expected[n] = torch.eye(2, dtype=f64)
    torch.testing.assert_close(Lam, expected)


def test_dense_fisher_exact_equals_expectation_over_labels():
    model = _mlp(seed=2)
    x = randn(4, 4, seed=41)
    p = torch.softmax(model(x).detach(), 1)
    F = torch.zeros(35, 35, dtype=f64)
    for c in range(3):
        g = per_sample_loss_gradients(model, x, torch.full((4,), c), "classification")
        F = F + torch.einsum("n,np,nq->pq", p[:, c], g, g) / 4
    torch.testing.assert_close(dense_fisher(model, x), F)


def test_dense_fisher_binary_and_regression():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # float32, biases
    x = torch.randn(5, 3)
    before = [p.detach().clone() for p in model.parameters()]
    F = dense_fisher(model, x, likelihood="binary")
    assert F.dtype == f64 and F.shape == (26, 26)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # expectation over the 4 label combinations
    m64 = copy.deepcopy(model).double()
    s = torch.sigmoid(m64(x.double())).detach()
    expected = 0
    for y0 in (0.0, 1.0):
        for y1 in (0.0, 1.0):
            y = torch.tensor([y0, y1], dtype=f64).expand(5, 2)
            prob = torch.prod(torch.where(y == 1, s, 1 - s), dim=1)
            g = per_sample_loss_gradients(m64, x.double(), y, "binary")
            expected = expected + torch.einsum("n,np,nq->pq", prob, g, g) / 5
    torch.testing.assert_close(F, expected)
    # regression: exact = JᵀJ/N; empirical with y = f + r has g = Jᵀ r
    J = per_sample_jacobians(m64, x.double())
    torch.testing.assert_close(dense_fisher(model, x, likelihood="regression"),
                               torch.einsum("ncp,ncq->pq", J, J) / 5)
    r = randn(5, 2, seed=42)
    y = m64(x.double()).detach() + r
    g = torch.einsum("ncp,nc->np", J, -r)
    torch.testing.assert_close(
        dense_fisher(model, x, y, likelihood="regression", kind="empirical"), g.T @ g / 5)


def test_dense_fisher_mc_and_param_subset():
    model = _mlp(seed=4)
    x = randn(3, 4, seed=43)
    y_hat = torch.randint(0, 3, (2, 3), generator=gen(44))  # (S, N)
    F_mc = dense_fisher(model, x, y_hat, kind="mc")
    F_emp = [dense_fisher(model, x, y_hat[s], kind="empirical") for s in range(2)]
    torch.testing.assert_close(F_mc, (F_emp[0] + F_emp[1]) / 2)
    F = dense_fisher(model, x)
    F2 = dense_fisher(model, x, params=[model[2].weight])
    torch.testing.assert_close(F2, F[20:, 20:])
    F_bd = dense_block_diagonal(F, [20, 15])
    torch.testing.assert_close(F_bd, torch.block_diag(F[:20, :20], F[20:, 20:]))


def test_dense_helpers_bad_input():
    model = _mlp()
    x = randn(3, 4)
    with pytest.raises(ValueError, match=r"unknown likelihood 'poisson'; supported: \["):
        dense_fisher(model, x, likelihood="poisson")
    with pytest.raises(ValueError, match=r"unknown kind 'ggn'; supported: \['exact', 'empirical', 'mc'\]"):
        dense_fisher(model, x, kind="ggn")
    with pytest.raises(ValueError, match="needs targets"):
        dense_fisher(model, x, kind="empirical")
    with pytest.raises(ValueError, match=r"shape \(S, N, \.\.\.\) with N = 3"):
        dense_fisher(model, x, torch.zeros(3, dtype=torch.long), kind="mc")
    with pytest.raises(ValueError, match="is not a parameter of Sequential"):
        dense_fisher(model, x, params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match="int64 class indices"):
        per_sample_loss_gradients(model, x, torch.zeros(3), "classification")
    with pytest.raises(ValueError, match=r"block_sizes \[3\] do not sum to P = 4"):
        dense_block_diagonal(torch.eye(4), [3])


def test_outer_factor_columns_match_explicit_and_default():
    """``columns`` (chunked materialisation of U) equals U @ I and the per-sample gradients."""
    from curvkit.linalg import LowRankFactor, OuterProductFactor, StackedFactor

    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 4, 5, dtype=torch.float64, generator=g)
    e = torch.randn(6, 4, 2, dtype=torch.float64, generator=g)  # R = 2, T = 4
    f = OuterProductFactor(a, e)
    U = f.matmat(torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(f.columns(0, 6), U)
    torch.testing.assert_close(f.columns(2, 5), LowRankFactor.columns(f, 2, 5))
    st = StackedFactor([f, OuterProductFactor(a[:, :1], e[:, :1])])
    torch.testing.assert_close(st.columns(1, 4), st.matmat(torch.eye(6, dtype=torch.float64)[:, 1:4]))

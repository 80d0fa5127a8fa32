"""The optimizers' factorised Kronecker inverses: inverse or Cholesky factor by the cost rule, both
forms against a dense float64 solve, the float64 side applied in float64, state round trip."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from curvkit.linalg import Kronecker
from curvkit.linalg.finite import all_finite
from curvkit.linalg.kronecker_inverse import KroneckerInverse, damped_side, holds_factor
from curvkit.optim import FOOF, KFAC

f64 = torch.float64


def _psd(n: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    X = torch.randn(3 * n, n, generator=g, dtype=f64)
    return (X.T @ X / (3 * n)).to(dtype)


def test_cost_rule_both_sides():
    """The factor is held when applied once, or when 4·uses·k ≤ n; else (and for unknown use) the
    inverse."""
    assert holds_factor(1000, 1000, 1) and holds_factor(1000, 10, 25)
    assert not holds_factor(1000, 10, 26) and not holds_factor(1000, 1000, 2)
    assert not holds_factor(1000, 1, None)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("mode", ["heuristic", "exact"])
@pytest.mark.parametrize("uses", [1, 100])
def test_both_forms_match_dense_float64(dtype, mode, uses):
    """``solve_matrix`` equals the dense float64 solve of the damped ``B ⊗ A`` (paper eqs 2–3), held
    as Cholesky factors (uses = 1) or inverses (uses = 100, k = n)."""
    g = torch.Generator().manual_seed(0)
    d_out, d_in, lam = 6, 9, 0.3
    A, B = _psd(d_in, g, dtype), _psd(d_out, g, dtype)
    Bk = B if mode == "heuristic" else None
    K = Kronecker(Bk, A, d_out=d_out)
    inv = K.factorize(lam, mode, dtype=dtype, allow_float32=True, uses=uses)
    held = {k for k, v in inv.tensors.items() if v is not None}
    sides = {"A", "B"} if mode == "heuristic" else {"A"}
    assert held == {f"{s}_chol" if uses == 1 else f"{s}_inv" for s in sides}
    V = torch.randn(2, d_out, d_in, generator=g, dtype=f64)
    dense = K.damped_dense(lam, mode).double() if mode == "heuristic" else (
        torch.kron(torch.eye(d_out, dtype=f64), A.double()) + lam * torch.eye(d_out * d_in, dtype=f64))
    ref = torch.linalg.solve(dense, V.reshape(2, -1, 1)).reshape(V.shape)
    got = inv.solve_matrix(V.to(dtype))
    assert got.dtype == dtype and got.shape == V.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    if mode == "heuristic":  # App. D.9: the A side alone, in either form
        lam_a = K.damping_split(lam)[0]
        ref_a = V @ torch.linalg.inv(A.double() + lam_a * torch.eye(d_in, dtype=f64))
        torch.testing.assert_close(inv.solve_input(V.to(dtype)).double(), ref_a, rtol=tol, atol=tol)
        torch.testing.assert_close(inv.input_inverse().double(), torch.linalg.inv(
            A.double() + lam_a * torch.eye(d_in, dtype=f64)), rtol=tol, atol=tol)


def test_ill_conditioned_float32_side_is_held_and_applied_in_float64():
    """A float32 side with ``1 + tr(S)/λ > 10³`` is factorised in float64 and its held Cholesky
    factor applied in float64: the float32 result is accurate to float32 output rounding."""
    g = torch.Generator().manual_seed(1)
    S = _psd(40, g, torch.float32) * 100.0  # tr ≈ 4000
    lam = 1e-2
    inv, L = damped_side(S, lam, k=2, uses=1, allow_float32=True)
    assert inv is None and L is not None and L.dtype == f64
    V = torch.randn(2, 40, generator=g)
    got = KroneckerInverse("exact", lam, lam, 1.0, A_chol=L).solve_matrix(V)
    ref = V.double() @ torch.linalg.inv(S.double() + lam * torch.eye(40, dtype=f64))
    assert got.dtype == torch.float32
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-6


def test_all_finite_exact():
    """The one-reduction check is exact: an overflowing sum of finite entries is finite."""
    big = torch.full((4,), 3e38)
    assert all_finite(big) and all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(5)
        x[2] = bad
        assert not all_finite(x)


@pytest.mark.parametrize("cls", [FOOF, KFAC])
def test_inv_period_one_state_round_trip(cls):
    """``inv_period=1`` holds Cholesky factors; ``state_dict`` round-trips through
    ``torch.load(weights_only=True)`` and the loaded optimizer takes the same step."""
    torch.manual_seed(0)

    def make():
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        kw = {"kind": "exact"} if cls is KFAC else {}
        return model, cls(model, lr=0.1, damping=0.1, inv_period=1, **kw)

    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    model, opt = make()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    pieces = opt.state[next(model.parameters())]["precond"]
    assert pieces["A_chol"] is not None and pieces["A_inv"] is None
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    model2, opt2 = make()
    model2.load_state_dict(model.state_dict())
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
    d1, d2 = opt.direction(), opt2.direction()
    for a, b in zip(d1, d2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

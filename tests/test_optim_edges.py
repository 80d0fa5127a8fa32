"""Edges of the factored optimizers (issues 10 and 15): default ``ema_steps``, following
``model.to(dtype)``, parameters without ``.grad``, the deprecated damping-mode alias, and
eigendecompositions that do not crash on ill-conditioned float32 Kronecker factors."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from curvkit.linalg import Kronecker
from curvkit.linalg import kronecker as kron_mod
from curvkit.optim import FOOF, KFAC
from tests.cases import mlp
from tests.optim_refs import (
    A_hat,
    _one_thread,  # noqa: F401  (autouse fixture)
    f64,
    loss_backward,
)


@pytest.mark.parametrize("cls", [FOOF, KFAC])
def test_inv_period_one_derives_ema_steps(cls):
    opt = cls(mlp(True).model, lr=0.1, damping=0.1, inv_period=1)
    assert opt.schedule.ema_steps == 1
    assert cls(mlp(True).model, lr=0.1, damping=0.1, inv_period=7).schedule.ema_steps == 7
    with pytest.raises(ValueError, match="ema_steps=3 > inv_period=2"):
        cls(mlp(True).model, lr=0.1, damping=0.1, inv_period=2, ema_steps=3)


@pytest.mark.parametrize("make", [
    lambda m: FOOF(m, lr=0.1, damping=0.5, inv_period=2, momentum=0.9),
    lambda m: KFAC(m, lr=0.1, damping=0.5, inv_period=2, momentum=0.9),
    lambda m: KFAC(m, lr=0.1, damping=0.5, inv_period=2, momentum=0.9, damping_mode="exact"),
], ids=["foof", "kfac", "kfac_exact"])
def test_follows_model_to_dtype(make):
    """After ``model.to(torch.float64)`` the optimizer keeps training in float64: factors, inverses
    and momentum follow the parameters (as for torch.optim), no dtype error."""
    case = mlp(True)
    model = case.model.float()
    opt = make(model)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(5)]
    for t, (x, y) in enumerate(batches):
        if t == 2:
            model.to(torch.float64)
        opt.zero_grad()
        loss_backward(model, x.to(next(model.parameters()).dtype), y)
        opt.step()
    assert opt.dtype == f64 and all(p.dtype == f64 for p in model.parameters())
    assert all(v.dtype == f64 for d in opt.factors() for v in d.values())
    first = next(model.parameters())
    assert all(v.dtype == f64 for k, v in opt.state[first]["precond"].items()
               if isinstance(v, torch.Tensor))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cls", [FOOF, KFAC])
def test_parameter_without_grad_is_not_updated(cls):
    """As torch.optim: a bias whose ``.grad`` is None stays put, also when its layer's weight has a
    gradient (the weight is preconditioned with a zero bias column, [G | 0] P)."""
    case = mlp(True)
    model, x, y = case.model, case.inputs, case.targets
    opt = cls(model, lr=0.5, damping=0.2, ema_decay=0.0, inv_period=1, weight_decay=0.1,
              **({"kind": "exact"} if cls is KFAC else {}))
    opt.zero_grad()
    loss_backward(model, x, y)
    lin = model[0]
    lin.bias.grad = None
    b0, W0, G = lin.bias.detach().clone(), lin.weight.detach().clone(), lin.weight.grad.clone()
    d = opt.direction()
    opt.step()
    assert torch.equal(lin.bias.detach(), b0)
    assert torch.count_nonzero(d[1]) == 0
    if cls is FOOF:
        P = torch.linalg.inv(A_hat(lin, x) + 0.2 * torch.eye(6, dtype=f64))
        M = torch.cat([G, torch.zeros(4, 1, dtype=f64)], 1) @ P
        expected = W0 - 0.5 * 0.1 * W0 - 0.5 * M[:, :5]
        torch.testing.assert_close(lin.weight.detach(), expected, rtol=1e-10, atol=1e-12)
    else:
        assert not torch.equal(lin.weight.detach(), W0)


def test_standard_damping_is_a_deprecated_alias():
    case = mlp(True)
    with pytest.warns(DeprecationWarning, match="damping_mode='standard' is deprecated; use "
                                                "damping_mode='exact'"):
        old = KFAC(case.model, lr=0.1, damping=0.1, kind="exact", damping_mode="standard")
    assert old.damping_mode == "exact"
    new = KFAC(case.model, lr=0.1, damping=0.1, kind="exact", damping_mode="exact")
    loss_backward(case.model, case.inputs, case.targets)
    for a, b in zip(old.direction(), new.direction()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- eigh that does not converge
def rank_deficient_factor(n: int = 576, nonzero: int = 36, seed: int = 0) -> torch.Tensor:
    """The pattern of the failing resnet18 factor (4608×4608, 290 non-zero rows, float32), scaled
    down: a float32 PSD matrix that is zero outside ``nonzero`` scattered rows/columns, whose
    non-zero block is a Gram of highly correlated post-ReLU activations."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=g)[:nonzero]
    base = torch.randn(64, 1, generator=g)
    X = (base + 1e-3 * torch.randn(64, nonzero, generator=g)).relu()
    S = torch.zeros(n, n)
    S[rows[:, None], rows[None, :]] = (X.T @ X / 64).float()
    return S


class _FailingEigh:
    """``torch.linalg.eigh`` that raises LAPACK's non-convergence ``fails`` times, then works."""

    def __init__(self, fails: int) -> None:
        self.fails, self.calls, self.real = fails, 0, torch.linalg.eigh

    def __call__(self, S, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.fails:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge because "
                                           "the input matrix is ill-conditioned")
        return self.real(S, *args, **kwargs)


@pytest.mark.parametrize("fails, how", [(1, "trace-scaled shift"), (2, "scipy's 'evr' driver")])
def test_eigh_fallback_on_ill_conditioned_float32_factor(monkeypatch, fails, how):
    """Standard damping on a rank-deficient float32 factor: when eigh does not converge, the
    shift (then scipy's evr driver) gives the same damped solve as a dense float64 reference, and
    says so in one warning per factor."""
    A = rank_deficient_factor()
    B = torch.tensor([[2.0, 0.3], [0.3, 1.0]])
    lam = 1e-3
    V = torch.randn(2, A.shape[0], generator=torch.Generator().manual_seed(1), dtype=f64)
    # dense float64 reference on the PSD factor (float32 round-off leaves eigenvalues ~ -1e-7,
    # which KFAC clamps at 0: the true factor is PSD)
    s, U = torch.linalg.eigh(A.double())
    A_psd = (U * s.clamp_min(0)) @ U.T
    dense = torch.kron(B.double(), A_psd) + lam * torch.eye(2 * A.shape[0], dtype=f64)
    ref = torch.linalg.solve(dense, V.reshape(-1)).reshape(V.shape)
    fake = _FailingEigh(fails)
    monkeypatch.setattr(torch.linalg, "eigh", fake)
    monkeypatch.setattr(kron_mod, "_WARNED", set())
    name = f"resnet-like[{fails}]"
    K = Kronecker(B, A, name=name)
    with pytest.warns(RuntimeWarning, match=re.escape(f"{name}.A: torch.linalg.eigh did not converge")
                      + ".*" + re.escape(how)):
        inv = K.factorize(lam, "exact")
    torch.testing.assert_close(inv.solve_matrix(V), ref, rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings():  # once per factor name
        warnings.simplefilter("error")
        Kronecker(B, A, name=name).factorize(lam, "exact")


def test_rank_deficient_float32_factor_in_kfac_does_not_crash():
    """A float32 KFAC layer whose inputs are zero on most features (the resnet18 pattern) steps in
    both damping modes with finite, float32 updates."""
    torch.manual_seed(0)
    for mode in ("heuristic", "exact"):
        lin = nn.Linear(576, 3, bias=False)
        opt = KFAC(lin, lr=0.1, damping=1e-4, damping_mode=mode, inv_period=1, kind="exact")
        S = rank_deficient_factor()
        rows = S.diagonal().nonzero()[:, 0]
        x = torch.zeros(16, 576)
        x[:, rows] = torch.randn(16, 1).relu() + 1e-3 * torch.randn(16, rows.numel())
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x), torch.randint(0, 3, (16,))).backward()
        opt.step()
        assert lin.weight.dtype == torch.float32 and torch.isfinite(lin.weight).all()


# ---------------------------------------------------------------------- float32 / float64 rule
def test_inversion_dtype_rule_both_sides():
    """Optimizer inversions factorise a float32 ``S + λI`` in float32 iff ``1 + tr(S)/λ ≤ 10³``;
    otherwise (and for float64 factors, and for curvature solves) in float64. Both sides stay
    accurate against a float64 inverse."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 20, generator=g, dtype=f64)
    S64 = X.T @ X / 50  # tr ≈ 20
    S = S64.float()
    for lam, expect, tol in ((1.0, torch.float32, 1e-5), (1e-4, torch.float64, 1e-6)):
        assert kron_mod.factorisation_dtype(S, lam) == expect
        ref = torch.linalg.inv(S.double() + lam * torch.eye(20, dtype=f64))
        got = kron_mod.damped_inverse(S, lam, allow_float32=True)
        assert got.dtype == torch.float32
        err = float((got.double() - ref).norm() / ref.norm())
        assert err < tol, (lam, err)
    assert kron_mod.factorisation_dtype(S64, 1.0) == f64
    # the rule's bound: κ(S + λI) ≤ 1 + tr(S)/λ
    ev = torch.linalg.eigvalsh(S64)
    assert (ev.max() + 1.0) / (ev.min() + 1.0) <= 1 + float(S64.trace()) / 1.0

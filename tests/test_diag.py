"""Dense float64 tests of ``structure="diag"`` (capture backend and BackPACK backend).

Ground truth: ``diag`` of the dense Fisher from ``curvkit.testing.dense_fisher`` (``torch.func``),
for every kind; the MC kind with the labels the capture drew (``F.captured.sampled``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.testing import assert_operator_matches, dense_fisher
from tests.cases import Case, all_cases, mlp, regression

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

f64 = torch.float64
LAM = 1e-2
KINDS = ("exact", "empirical", "mc")
CASES = [(c, k) for c in all_cases() for k in KINDS]
IDS = [f"{c.name}-{k}" for c, k in CASES]


def build(case: Case, kind: str = "exact", **kw) -> curvkit.Curvature:
    return curvkit.fisher(case.model, case.inputs, case.targets, likelihood=case.likelihood,
                          kind=kind, structure="diag", **kw)


def dense_diag(case: Case, kind: str, sampled: torch.Tensor | None = None) -> torch.Tensor:
    targets = sampled if kind == "mc" else case.targets
    F = dense_fisher(case.model, case.inputs, targets, likelihood=case.likelihood, kind=kind)
    return F.diagonal()


@pytest.mark.parametrize("case,kind", CASES, ids=IDS)
def test_diag_matches_dense_diagonal(case, kind):
    F = build(case, kind, mc_samples=2, generator=torch.Generator().manual_seed(0))
    d = dense_diag(case, kind, F.captured.sampled)
    assert_operator_matches(F, torch.diag(d), damping=LAM)


@pytest.mark.parametrize("case", all_cases(), ids=[c.name for c in all_cases()])
def test_diag_equals_diagonal_of_full_and_block_diag(case):
    d = build(case).diagonal()
    for structure in ("full", "block_diag"):
        F = curvkit.fisher(case.model, case.inputs, case.targets, likelihood=case.likelihood,
                           structure=structure)
        torch.testing.assert_close(d, F.diagonal(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("case,kind", [(c, k) for c, k in CASES if k != "mc"],
                         ids=[i for i in IDS if not i.endswith("mc")])
def test_backpack_matches_capture(case, kind):
    """DiagGGNExact (exact) and BatchGrad² (empirical) equal curvkit's diagonal after rescaling."""
    d = build(case, kind).diagonal()
    db = build(case, kind, backend="backpack").diagonal()
    torch.testing.assert_close(db, d, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(db, dense_diag(case, kind), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("case", [mlp(True, n=4), regression(n=4)], ids=["mlp", "regression"])
def test_backpack_mc_in_expectation(case):
    """DiagGGNMC draws its own labels: it agrees with the exact diagonal in expectation only."""
    S = 300  # N·S = 1200 draws: relative error about 2–6%
    exact = build(case).diagonal()
    g = torch.Generator().manual_seed(0)
    for backend in ("capture", "backpack"):
        d = build(case, "mc", mc_samples=S, generator=g, backend=backend).diagonal()
        assert torch.linalg.norm(d - exact) / torch.linalg.norm(exact) < 0.1


def test_backpack_mc_reproducible_and_global_rng_untouched():
    case = mlp(True)
    state = torch.get_rng_state()
    d1 = build(case, "mc", backend="backpack", generator=torch.Generator().manual_seed(5)).diagonal()
    assert torch.equal(torch.get_rng_state(), state)
    d2 = build(case, "mc", backend="backpack", generator=torch.Generator().manual_seed(5)).diagonal()
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)


def test_backpack_leaves_user_model_alone():
    case = mlp(True)
    build(case, backend="backpack")
    for p in case.model.parameters():
        assert not hasattr(p, "diag_ggn_exact") and p.grad is None
    assert all(not m._forward_hooks and not m._backward_hooks for m in case.model.modules())


def test_backpack_respects_selected_params():
    case = mlp(True)
    params = [case.model[0].weight, case.model[2].bias]
    kw = dict(likelihood=case.likelihood, structure="diag", params=params)
    d = curvkit.fisher(case.model, case.inputs, case.targets, **kw).diagonal()
    db = curvkit.fisher(case.model, case.inputs, case.targets, backend="backpack", **kw).diagonal()
    torch.testing.assert_close(db, d, rtol=1e-10, atol=1e-14)
    full = dense_fisher(case.model, case.inputs, case.targets, likelihood=case.likelihood,
                        params=params).diagonal()
    torch.testing.assert_close(d, full, rtol=1e-10, atol=1e-14)


def test_float32():
    case = mlp(True)
    model = case.model.float()
    F = curvkit.fisher(model, case.inputs.float(), case.targets, structure="diag")
    Fb = curvkit.fisher(model, case.inputs.float(), case.targets, structure="diag", backend="backpack")
    assert F.dtype == torch.float32
    torch.testing.assert_close(Fb.diagonal(), F.diagonal(), rtol=1e-5, atol=1e-7)
    case.model.double()


# ---------------------------------------------------------------------- bad input
class _Functional(nn.Module):
    """Uses a functional op between layers: fine for the capture, not for BackPACK."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_bad_input():
    case = mlp(True)
    with pytest.raises(ValueError, match=r"unknown backend 'asdl' for structure='diag'; valid: "
                                         r"\['capture', 'backpack'\]"):
        build(case, backend="asdl")
    with pytest.raises(TypeError, match=r"structure='diag' got unknown options \['route'\]"):
        build(case, route="dual")
    for backend in ("capture", "backpack"):
        with pytest.raises(ValueError, match="kind='empirical' needs the data targets"):
            curvkit.fisher(case.model, case.inputs, None, kind="empirical", structure="diag",
                           backend=backend)
    model = _Functional().double()
    x = torch.randn(5, 3, dtype=f64)
    y = torch.randint(0, 2, (5,))
    d = curvkit.fisher(model, x, y, structure="diag").diagonal()
    assert torch.isfinite(d).all()
    with pytest.raises(RuntimeError, match="BackPACK could not compute the diagonal.*backend='capture'"):
        curvkit.fisher(model, x, y, structure="diag", backend="backpack")
    F = build(case)
    with pytest.raises(ValueError, match=r"supports \['exact'\]"):
        F.solve(torch.ones(F.shape[0], dtype=f64), 1e-3, damping_mode="heuristic")


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_backpack_refuses_per_position_outputs(likelihood):
    # (N, T, C) outputs: every position is a loss term; BackPACK's diagonal is per input, so
    # it must refuse rather than return a diagonal scaled by 1/N instead of 1/(N·T).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5)).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 6)) if likelihood == "classification" else torch.randn(2, 6, 5).double()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"backend='backpack' supports \(N, C\) outputs only.*"
                                         r"\(2, 6, 5\).*Use backend='capture'"):
        curvkit.fisher(model, x, y, likelihood=likelihood, kind="exact", structure="diag",
                       backend="backpack")
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())
    ok = curvkit.fisher(model, x, y, likelihood=likelihood, kind="exact", structure="diag")
    assert ok.diagonal().shape == (sum(p.numel() for p in model.parameters()),)

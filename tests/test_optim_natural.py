"""NaturalGradient builds through the curvature builder: its step is ``−η fisher(...).solve(g, λ)``,
also after a state-dict reload (``curvkit.curvature.build.from_captured``); float64."""

from __future__ import annotations

import io

import pytest
import torch
from torch.nn import functional as nnf

import curvkit
from curvkit.curvature.build import from_captured
from curvkit.optim import NaturalGradient
from tests.cases import mlp

LR, LAM = 0.3, 0.05


def _grad_step(model, x, y) -> list[torch.Tensor]:
    model.zero_grad()
    nnf.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in ts])


@pytest.mark.parametrize("structure", ["full", "block_diag"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_step_is_minus_lr_fisher_solve(kind, structure):
    case = mlp(True)
    model, x, y = case.model, case.inputs, case.targets
    opt = NaturalGradient(model, lr=LR, damping=LAM, kind=kind, structure=structure,
                          fisher_batch="same")
    g = _grad_step(model, x, y)
    F = curvkit.fisher(model, x, y, kind=kind, structure=structure)
    expected = _flat(model.parameters()) - LR * _flat(F.solve(g, LAM))
    opt.step(targets=y)
    torch.testing.assert_close(_flat(model.parameters()), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("structure", ["full", "block_diag"])
def test_reloaded_fisher_is_the_builders(structure):
    """After ``load_state_dict`` the kept Fisher (step 1 of ``inv_period=2``) is rebuilt by the
    structure builder: the step equals ``−η F₀.solve(g₁, λ)`` with ``F₀`` of step 0."""
    case = mlp(True)
    model, x0, y0 = case.model, case.inputs, case.targets
    x1, y1 = torch.randn(5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    opt = NaturalGradient(model, lr=LR, damping=LAM, kind="exact", structure=structure,
                          inv_period=2, fisher_batch="same")
    _grad_step(model, x0, y0)
    F0 = curvkit.fisher(model, x0, kind="exact", structure=structure)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = NaturalGradient(model, lr=LR, damping=LAM, kind="exact", structure=structure,
                            inv_period=2, fisher_batch="same")
    other.load_state_dict(torch.load(buf))
    g1 = _grad_step(model, x1, y1)
    expected = _flat(model.parameters()) - LR * _flat(F0.solve(g1, LAM))
    other.step()
    torch.testing.assert_close(_flat(model.parameters()), expected, rtol=0, atol=1e-15)


def test_from_captured_equals_fisher_and_refuses_a_mismatch():
    case = mlp(True)
    F = curvkit.fisher(case.model, case.inputs, kind="exact", structure="kfac")
    G = curvkit.fisher(case.model, case.inputs, kind="exact", structure="full")
    R = from_captured(case.model, G.captured.a, G.captured.e, num_data=G.num_data,
                      structure="kfac")
    assert (R.structure, R.kind, R.num_data) == ("kfac", "exact", 6)
    torch.testing.assert_close(R.to_dense(), F.to_dense(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"from_captured: 1 inputs and 2 errors for 2 layers"):
        from_captured(case.model, G.captured.a[:1], G.captured.e, num_data=6)

"""EWC state dicts: every structure and kind through torch.save / torch.load(weights_only=True),
into a fresh EWC on a fresh model; refusals of another structure or layout; non-standard layers."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvkit.ewc import EWC
from curvkit.testing import dense_fisher

KAPPA = 2.3
STRUCTURES = ("full", "block_diag", "kfac", "foof", "diag")
KINDS = ("exact", "mc", "empirical")


def _model(seed: int = 0, layernorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    mid = [nn.LayerNorm(4)] if layernorm else []
    return nn.Sequential(nn.Linear(5, 4), *mid, nn.Tanh(), nn.Linear(4, 3)).double()


def _data(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g)


@torch.no_grad()
def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _penalty_and_grad(ewc: EWC, model: nn.Module):
    pen = ewc.penalty()
    return pen.detach(), torch.autograd.grad(pen, list(model.parameters()))


def _reload(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)  # default weights_only=True: plain data only


@pytest.mark.parametrize("decay", [None, 0.6])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_round_trip_into_fresh_model(structure, kind, decay):
    model = _model()
    ewc = EWC(model, KAPPA, kind=kind, structure=structure, decay=decay, mc_samples=2,
              generator=torch.Generator().manual_seed(3))
    for t in range(2):
        ewc.consolidate(*_data(10 + t))
        _perturb(model, 20 + t)
    fresh = _model(seed=5)  # other weights, same architecture
    fresh.load_state_dict(model.state_dict())
    other = EWC(fresh, 1.0, structure=structure)
    other.load_state_dict(_reload(ewc.state_dict()))
    assert (other.strength, other.kind, other.decay, other.num_tasks) == (KAPPA, kind, decay, 2)
    pen, grad = _penalty_and_grad(ewc, model)
    pen2, grad2 = _penalty_and_grad(other, fresh)
    assert pen > 0
    torch.testing.assert_close(pen2, pen, rtol=0, atol=0)
    for g, g2 in zip(grad, grad2):
        torch.testing.assert_close(g2, g, rtol=0, atol=0)
    assert other.memory_bytes() == ewc.memory_bytes()


@pytest.mark.parametrize("structure", ["full", "block_diag"])
def test_round_trip_primal_route_over_a_loader(structure):
    model = _model()
    X, y = _data(4, n=40)  # M = 40·3 ≥ P = 39: the union takes the primal (dense) route
    ewc = EWC(model, KAPPA, structure=structure)
    ewc.consolidate(DataLoader(TensorDataset(X, y), batch_size=16), progress=False)
    term = ewc.state_dict()["terms"][0]
    assert term["form"] == "operator"
    assert term["operator"]["type"] == ("dense" if structure == "full" else "blockdiag")
    _perturb(model, 1)
    other = EWC(model, structure=structure)
    other.load_state_dict(_reload(ewc.state_dict()))
    torch.testing.assert_close(other.penalty(), ewc.penalty(), rtol=0, atol=0)


def test_load_refuses_another_structure_and_layout():
    model = _model()
    ewc = EWC(model, structure="kfac")
    ewc.consolidate(*_data(1))
    state = _reload(ewc.state_dict())
    with pytest.raises(ValueError, match=r"holds structure='kfac' Fishers but this EWC has "
                                         r"structure='full'"):
        EWC(model, structure="full").load_state_dict(state)
    wider = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    target = EWC(wider, structure="kfac")
    with pytest.raises(ValueError, match=r"changed shape since consolidation \(or is another "
                                         r"model\): the state has layers \['0' 4×6"):
        target.load_state_dict(state)
    renamed = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Identity(), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match=r"parameters \['2.weight', '2.bias'\] no longer exist"):
        EWC(renamed, structure="kfac").load_state_dict(state)
    with pytest.raises(RuntimeError, match="before any consolidate"):
        target.penalty()  # the failed loads left it untouched


def test_user_structures_save_when_linalg_can():
    """A registered structure built from linalg operators round-trips; a user's own operator
    class is refused with a message naming it."""
    from curvkit.curvature import register_structure
    from curvkit.curvature.build import _STRUCTURES
    from curvkit.linalg import Diagonal, LinearOperator

    class Ones(LinearOperator):
        def _matmat(self, X):
            return X

    @register_structure("ewc_test_diag", uses_loss=False)
    def build(ctx, **options):
        P = sum(layer.size for layer in ctx.layers)
        return Diagonal(torch.linspace(1, 2, P, dtype=torch.float64))

    @register_structure("ewc_test_own", uses_loss=False)
    def build_own(ctx, **options):
        return Ones(sum(layer.size for layer in ctx.layers), torch.float64, torch.device("cpu"))

    try:
        model = _model()
        ewc, own = EWC(model, structure="ewc_test_diag"), EWC(model, structure="ewc_test_own")
        ewc.consolidate(*_data(2))
        own.consolidate(*_data(2))
        _perturb(model, 3)
        other = EWC(model, structure="ewc_test_diag")
        other.load_state_dict(_reload(ewc.state_dict()))
        assert ewc.penalty() > 0
        torch.testing.assert_close(other.penalty(), ewc.penalty(), rtol=0, atol=0)
        assert own.penalty() > 0
        with pytest.raises(TypeError, match=r"structure 'ewc_test_own' keeps its Fisher as a Ones "
                                            r"operator, which has no plain-tensor state"):
            own.state_dict()
    finally:
        _STRUCTURES.pop("ewc_test_diag")
        _STRUCTURES.pop("ewc_test_own")


@pytest.mark.parametrize("structure", ["full", "block_diag", "diag"])
def test_non_standard_layer_blocks(structure):
    """LayerNorm's affine parameters (explicit rule, block (2d × 1)) are protected exactly."""
    model = _model(layernorm=True)
    x, y = _data(7)
    F = dense_fisher(model, x, y, likelihood="classification", kind="exact")
    if structure != "full":  # block_diag / diag of the dense Fisher, in parameter order
        sizes = [4 * 5 + 4, 8, 3 * 4 + 3]
        mask = torch.block_diag(*[torch.ones(s, s, dtype=torch.float64) for s in sizes])
        F = F * (mask if structure == "block_diag" else torch.eye(F.shape[0], dtype=F.dtype))
    ewc = EWC(model, KAPPA, structure=structure)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ewc.consolidate(x, y)
    _perturb(model, 8)
    d = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - theta0
    pen, grad = _penalty_and_grad(ewc, model)
    torch.testing.assert_close(pen, 0.5 * KAPPA * d @ F @ d, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grad]), KAPPA * F @ d,
                               rtol=1e-10, atol=1e-13)
    other = EWC(model, structure=structure)
    other.load_state_dict(_reload(ewc.state_dict()))
    torch.testing.assert_close(other.penalty(), pen, rtol=0, atol=0)

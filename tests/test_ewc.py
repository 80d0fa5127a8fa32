"""EWC: penalty value and gradient vs dense float64 Fishers, accumulation, memory, state, bad input."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import curvkit
from curvkit.capture import sample_targets
from curvkit.ewc import EWC
from curvkit.testing import dense_block_diagonal, dense_fisher
from tests.cases import all_cases, cnn, mlp

CASES = all_cases()
KINDS = ("exact", "mc", "empirical")
KAPPA = 3.7
SEED = 11


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 problems: one intra-op thread (avoids oversubscription on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in ts])


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def _perturb(model: nn.Module, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in _params(model):
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _dense(case, kind: str, mc_samples: int = 2, params=None) -> torch.Tensor:
    """Dense float64 Fisher at the current parameters, with the MC labels EWC will draw."""
    if kind == "mc":
        with torch.no_grad():
            out = case.model(case.inputs)
        sampled = sample_targets(out, case.likelihood, mc_samples, torch.Generator().manual_seed(SEED))
        return dense_fisher(case.model, case.inputs, sampled, likelihood=case.likelihood, kind="mc",
                            params=params)
    return dense_fisher(case.model, case.inputs, case.targets, likelihood=case.likelihood, kind=kind,
                        params=params)


def _ewc(case, kind: str, structure: str = "full", **kw) -> EWC:
    return EWC(case.model, KAPPA, kind=kind, structure=structure, likelihood=case.likelihood,
               mc_samples=2, generator=torch.Generator().manual_seed(SEED), **kw)


def _check_penalty(ewc: EWC, model: nn.Module, quad: torch.Tensor, grad: torch.Tensor,
                   rtol: float = 1e-10) -> None:
    """``penalty == (κ/2)·quad`` and ``∇penalty == κ·grad`` (flat, float64)."""
    pen = ewc.penalty()
    g = torch.autograd.grad(pen, _params(model))
    torch.testing.assert_close(pen.detach(), 0.5 * KAPPA * quad, rtol=rtol, atol=1e-14)
    torch.testing.assert_close(_flat(g), KAPPA * grad, rtol=rtol, atol=1e-14 + rtol * float(
        grad.abs().max()) * KAPPA)


# ---------------------------------------------------------------------- value and gradient
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_full_penalty_matches_dense(case, kind):
    ewc = _ewc(case, kind)
    F = _dense(case, kind)
    theta0 = _flat(_params(case.model))
    ewc.consolidate(case.inputs, case.targets)
    _perturb(case.model, 1)
    d = _flat(_params(case.model)) - theta0
    _check_penalty(ewc, case.model, d @ F @ d, F @ d)


def _structured_reference(case, kind: str, structure: str) -> torch.Tensor:
    if structure == "block_diag":
        F = curvkit.fisher(case.model, case.inputs, case.targets, likelihood=case.likelihood,
                           kind=kind, mc_samples=2, generator=torch.Generator().manual_seed(SEED))
        return dense_block_diagonal(_dense(case, kind), [layer.size for layer in F.layers])
    # kfac / diag: the Curvature's own dense matrix (the structure is the approximation)
    F = curvkit.fisher(case.model, case.inputs, case.targets, likelihood=case.likelihood, kind=kind,
                       structure=structure, mc_samples=2,
                       generator=torch.Generator().manual_seed(SEED))
    return F.to_dense().to(torch.float64)


@pytest.mark.parametrize("structure", ["block_diag", "kfac", "diag"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", [mlp(True), cnn()], ids=["mlp_bias", "cnn"])
def test_structured_penalty_matches_dense(case, kind, structure):
    if structure not in curvkit.structures():
        pytest.skip(f"structure {structure!r} not registered yet")
    F = _structured_reference(case, kind, structure)
    ewc = _ewc(case, kind, structure)
    theta0 = _flat(_params(case.model))
    ewc.consolidate(case.inputs, case.targets)
    _perturb(case.model, 2)
    d = _flat(_params(case.model)) - theta0
    _check_penalty(ewc, case.model, d @ F @ d, F @ d)


def test_params_subset():
    case = mlp(True)
    last = list(case.model[2].parameters())
    F = dense_fisher(case.model, case.inputs, likelihood="classification", kind="exact", params=last)
    ewc = EWC(case.model, KAPPA, params=last)
    theta0 = _flat(last)
    ewc.consolidate(case.inputs)
    _perturb(case.model, 3)
    d = _flat(last) - theta0
    pen = ewc.penalty()
    grads = torch.autograd.grad(pen, _params(case.model), allow_unused=True)
    assert grads[0] is None and grads[1] is None  # the first layer is not protected
    torch.testing.assert_close(pen.detach(), 0.5 * KAPPA * d @ F @ d, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(_flat(grads[2:]), KAPPA * F @ d, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------- accumulation
def _task_data(case, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.inputs.shape, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (x.shape[0],), generator=g)


@pytest.mark.parametrize("structure", ["full", "diag", "kfac"])
def test_multi_task_sums_anchored_penalties(structure):
    if structure not in curvkit.structures():
        pytest.skip(f"structure {structure!r} not registered yet")
    case = mlp(True)
    ewc = EWC(case.model, KAPPA, kind="exact", structure=structure)
    Fs, anchors = [], []
    for t in range(3):
        x, y = _task_data(case, 100 + t)
        ref = curvkit.fisher(case.model, x, y, kind="exact", structure=structure)
        Fs.append(dense_fisher(case.model, x, kind="exact") if structure == "full"
                  else ref.to_dense())
        anchors.append(_flat(_params(case.model)))
        ewc.consolidate(x, y)
        _perturb(case.model, 10 + t)
    theta = _flat(_params(case.model))
    quad = sum((theta - a) @ F @ (theta - a) for F, a in zip(Fs, anchors))
    grad = sum(F @ (theta - a) for F, a in zip(Fs, anchors))
    _check_penalty(ewc, case.model, quad, grad)
    assert ewc.num_tasks == 3 and len(ewc.state_dict()["anchors"]) == 3


@pytest.mark.parametrize("structure", ["full", "diag", "kfac"])
@pytest.mark.parametrize("decay", [0.5, 1.0])
def test_online_decayed_accumulation(structure, decay):
    if structure not in curvkit.structures():
        pytest.skip(f"structure {structure!r} not registered yet")
    case = mlp(True)
    ewc = EWC(case.model, KAPPA, kind="exact", structure=structure, decay=decay)
    F_acc = None
    for t in range(3):
        x, y = _task_data(case, 200 + t)
        ref = curvkit.fisher(case.model, x, y, kind="exact", structure=structure)
        F = dense_fisher(case.model, x, kind="exact") if structure == "full" else ref.to_dense()
        F_acc = F if F_acc is None else decay * F_acc + F  # F̃ ← γ F̃ + F_new
        anchor = _flat(_params(case.model))  # θ* = the latest
        ewc.consolidate(x, y)
        _perturb(case.model, 20 + t)
    d = _flat(_params(case.model)) - anchor
    _check_penalty(ewc, case.model, d @ F_acc @ d, F_acc @ d)
    assert len(ewc.state_dict()["anchors"]) == 1


def test_online_zero_decay_keeps_only_latest():
    case = mlp(True)
    ewc = EWC(case.model, KAPPA, decay=0.0)
    for t in range(2):
        x, y = _task_data(case, 300 + t)
        F = dense_fisher(case.model, x, kind="exact")
        anchor = _flat(_params(case.model))
        ewc.consolidate(x, y)
        _perturb(case.model, 30 + t)
    d = _flat(_params(case.model)) - anchor
    _check_penalty(ewc, case.model, d @ F @ d, F @ d)
    assert len(ewc.state_dict()["terms"]) == 1


# ---------------------------------------------------------------------- memory
def _full_formula(layers, N: int, R: int, itemsize: int = 8) -> int:
    """``b · N Σ_l T_l (d_in,l + R d_out,l)`` for layers given as ``(T, d_in, d_out)``."""
    return itemsize * N * sum(T * (d_in + R * d_out) for T, d_in, d_out in layers)


@pytest.mark.parametrize("kind,R", [("exact", 3), ("mc", 2), ("empirical", 1)])
def test_full_memory_is_the_formula(kind, R):
    case = mlp(True)  # Linear(5, 4) + bias, Linear(4, 3) + bias; N = 6
    ewc = _ewc(case, kind)
    ewc.consolidate(case.inputs, case.targets)
    N, P = 6, 5 * 4 + 4 + 4 * 3 + 3
    curv = _full_formula([(1, 6, 4), (1, 5, 3)], N, R)
    assert ewc.memory_breakdown() == {"curvature": curv, "anchors": 8 * P, "total": curv + 8 * P}
    x, y = _task_data(case, 5)
    ewc.consolidate(x, y)
    assert ewc.memory_bytes() == 2 * (curv + 8 * P)
    assert curv < 8 * P * N * R  # never P × M


def test_full_memory_formula_conv():
    case = cnn()  # conv(2→3, 3x3, pad 1) on 4x4: T=16; conv(3→2, 2x2, no bias) on 2x2: T=1; Linear(2, 3)
    ewc = EWC(case.model, KAPPA, kind="empirical")
    ewc.consolidate(case.inputs, case.targets)
    N = case.inputs.shape[0]
    P = sum(p.numel() for p in case.model.parameters())
    curv = _full_formula([(16, 2 * 9 + 1, 3), (1, 3 * 4, 2), (1, 3, 3)], N, 1)
    assert ewc.memory_breakdown() == {"curvature": curv, "anchors": 8 * P, "total": curv + 8 * P}


def test_diag_memory_is_P():
    if "diag" not in curvkit.structures():
        pytest.skip("structure 'diag' not registered yet")
    case = mlp(True)
    ewc = EWC(case.model, KAPPA, structure="diag", decay=0.9)
    P = sum(p.numel() for p in case.model.parameters())
    for t in range(3):
        ewc.consolidate(*_task_data(case, 400 + t))
    assert ewc.memory_bytes() == 2 * 8 * P  # merged diagonal + one anchor


# ---------------------------------------------------------------------- state
@pytest.mark.parametrize("decay", [None, 0.7])
def test_state_dict_round_trip(decay):
    case = mlp(True)
    ewc = EWC(case.model, KAPPA, kind="mc", generator=torch.Generator().manual_seed(0), decay=decay)
    for t in range(2):
        ewc.consolidate(*_task_data(case, 500 + t))
        _perturb(case.model, 40 + t)
    buf = io.BytesIO()
    torch.save(ewc.state_dict(), buf)
    buf.seek(0)
    other = EWC(case.model, 1.0, kind="exact")
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert (other.strength, other.kind, other.decay, other.num_tasks) == (KAPPA, "mc", decay, 2)
    torch.testing.assert_close(other.penalty(), ewc.penalty(), rtol=0, atol=0)
    assert other.memory_bytes() == ewc.memory_bytes()


def test_load_state_dict_rejects_other_model():
    case = mlp(True)
    ewc = EWC(case.model)
    ewc.consolidate(case.inputs)
    other = EWC(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 7)).double())
    with pytest.raises(ValueError, match="changed shape since consolidation"):
        other.load_state_dict(ewc.state_dict())
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({"version": 99})
    with pytest.raises(RuntimeError, match="before any consolidate"):
        other.penalty()  # the failed load left it untouched


def test_penalty_trains_back_towards_anchor():
    case = mlp(True)
    ewc = EWC(case.model, 10.0, kind="exact", structure="full")
    lam_max = float(torch.linalg.eigvalsh(dense_fisher(case.model, case.inputs)).max())
    ewc.consolidate(case.inputs, case.targets)
    _perturb(case.model, 7)
    opt = torch.optim.SGD(case.model.parameters(), lr=1.0 / (10.0 * lam_max))  # stable step
    first = float(ewc.penalty().detach())
    for _ in range(20):
        opt.zero_grad()
        ewc.penalty().backward()
        opt.step()
    assert float(ewc.penalty().detach()) < 0.5 * first


# ---------------------------------------------------------------------- bad input
def test_penalty_before_consolidate():
    ewc = EWC(mlp(True).model)
    with pytest.raises(RuntimeError, match=r"penalty\(\) called before any consolidate"):
        ewc.penalty()
    assert ewc.memory_bytes() == 0


def test_model_changed_shape():
    case = mlp(True)
    ewc = EWC(case.model)
    ewc.consolidate(case.inputs)
    case.model[2] = nn.Linear(4, 5).double()  # a wider head
    with pytest.raises(ValueError, match=r"changed shape since consolidation: layer '2'"):
        ewc.penalty()
    with pytest.raises(ValueError, match="layer layout changed"):
        ewc.consolidate(case.inputs)
    case.model[2] = nn.Linear(4, 3, bias=False).double()  # the bias parameter is gone
    with pytest.raises(ValueError, match=r"since consolidation: parameters \['2.bias'\] no longer"):
        ewc.penalty()


def test_non_finite_values():
    case = mlp(True)
    ewc = EWC(case.model)
    bad = case.inputs.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="inputs have non-finite"):
        ewc.consolidate(bad)
    ewc.consolidate(case.inputs)
    with torch.no_grad():
        case.model[0].weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="parameter '0.weight' has non-finite"):
        ewc.penalty()
    with pytest.raises(FloatingPointError, match="parameter '0.weight' has non-finite"):
        ewc.consolidate(case.inputs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"strength": float("nan")}, "strength must be a finite number"),
        ({"strength": -1.0}, "strength must be a finite number"),
        ({"decay": 1.5}, "decay must be None"),
        ({"structure": "nope"}, "unknown structure 'nope'; registered structures"),
        ({"kind": "fisher"}, "unknown kind"),
        ({"likelihood": "poisson"}, "unknown likelihood"),
        ({"mc_samples": 0}, "mc_samples must be a positive int"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EWC(mlp(True).model, **kwargs)


def test_foreign_params_rejected():
    with pytest.raises(ValueError, match=r"params\[0\].*is not a parameter of the model"):
        EWC(mlp(True).model, params=[nn.Parameter(torch.zeros(3))])

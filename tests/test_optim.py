"""Correctness of curvkit.optim: single steps against dense float64 computations, the toy example
of App. F, the Algorithm 1 schedule, momentum/weight decay, groups, schedulers, directions, and
training on digits.

The references here never use curvkit's capture: layer inputs come from running the
``nn.Sequential`` module by module, errors from ``torch.autograd.grad`` on the layer outputs, Fisher
matrices from ``curvkit.testing.dense`` (``torch.func``).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
from curvkit.datasets import load_digits
from curvkit.optim import FOOF, KFAC, NaturalGradient, Schedule
from curvkit.testing import dense_block_diagonal, dense_fisher
from tests.cases import cnn, mlp, single_linear_one_point

f64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids OpenMP stalls on a loaded machine (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------- references
def run_layers(model: nn.Sequential, x: torch.Tensor):
    """Run ``model`` module by module; return ``[(module, input, output)]`` for the layers with
    parameters (outputs attached to the graph) and the model output."""
    out = []
    h = x
    for mod in model:
        y = mod(h)
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            out.append((mod, h, y))
        h = y
    return out, h


def a_of(mod: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """``(N, T, d_in)`` layer inputs with a ones column for a bias."""
    if isinstance(mod, nn.Conv2d):
        a = F.unfold(inp, mod.kernel_size, mod.dilation, mod.padding, mod.stride).transpose(1, 2)
    else:
        a = inp.reshape(inp.shape[0], 1, -1)
    if mod.bias is not None:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], dim=2)
    return a.detach()


def A_hat(mod: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    a = a_of(mod, inp)
    return torch.einsum("nti,ntj->ij", a, a) / a.shape[0]


def grad_matrix(mod: nn.Module, attr: str = "grad") -> torch.Tensor:
    cols = [getattr(mod.weight, attr).reshape(mod.weight.shape[0], -1)]
    if mod.bias is not None:
        cols.append(getattr(mod.bias, attr).reshape(-1, 1))
    return torch.cat(cols, dim=1)


def params_of(mod: nn.Module) -> list[torch.Tensor]:
    return [mod.weight] + ([mod.bias] if mod.bias is not None else [])


def layer_matrix(mod: nn.Module) -> torch.Tensor:
    cols = [mod.weight.detach().reshape(mod.weight.shape[0], -1)]
    if mod.bias is not None:
        cols.append(mod.bias.detach().reshape(-1, 1))
    return torch.cat(cols, dim=1)


def B_hats(model: nn.Sequential, x: torch.Tensor, seeds: torch.Tensor) -> list[torch.Tensor]:
    """``B̂ = (1/T) Σ_{r,n,t} e eᵀ`` per layer for output seeds ``(N, R, C)`` (already scaled)."""
    layers, f = run_layers(model, x)
    outs = [y for _, _, y in layers]
    Bs = [0.0] * len(layers)
    for r in range(seeds.shape[1]):
        gs = torch.autograd.grad(f, outs, seeds[:, r], retain_graph=True)
        for i, ((mod, _, _), g) in enumerate(zip(layers, gs)):
            e = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2) if isinstance(mod, nn.Conv2d) \
                else g.reshape(g.shape[0], 1, -1)
            Bs[i] = Bs[i] + torch.einsum("nto,ntp->op", e, e) / e.shape[1]
    return Bs


def exact_seeds(f: torch.Tensor) -> torch.Tensor:
    """``√p_c (p − 1_c) / √N`` for classification (``(N, C, C)``)."""
    p = torch.softmax(f.detach(), 1)
    eye = torch.eye(p.shape[1], dtype=p.dtype)
    return p.sqrt().unsqueeze(2) * (p.unsqueeze(1) - eye) / math.sqrt(p.shape[0])


def mc_seeds(f: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    p = torch.softmax(f.detach().to(f64), 1)
    y = torch.multinomial(p, 1, replacement=True, generator=gen)[:, 0]
    return ((torch.softmax(f.detach(), 1) - F.one_hot(y, p.shape[1]).to(f.dtype)) / math.sqrt(
        p.shape[0])).unsqueeze(1)


def pi_split(A: torch.Tensor, B: torch.Tensor, lam: float) -> tuple[float, float]:
    pi = math.sqrt((A.trace() / A.shape[0]) / (B.trace() / B.shape[0]))
    return pi * math.sqrt(lam), math.sqrt(lam) / pi


def loss_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------- toy example (App. F)
def toy():
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    x = torch.tensor([[3.0, 1.0], [1.0, 0.0]], dtype=f64)
    y = torch.tensor([[1.0], [-1.0]], dtype=f64)
    return model, x, y


@pytest.mark.parametrize("lam_p, expected", [
    (1e-12, (-1.0, 4.0)),
    (1e-3, (-0.98714047, 3.95746394)),
    (1.0, (1 / 13, 5 / 13)),
    (100.0, (0.01792631, 0.00936853)),
])
def test_toy_example(lam_p, expected):
    """One FOOF step from w = 0 with lr 1 on the mean loss (1/N)Σ½(w·x − y)²: curvkit's Â is the
    batch mean (1/N)AAᵀ and the gradient is that of the mean loss, so the paper's sum-normalised
    damping λ_p maps to λ = λ_p/N and the learning rate stays 1 (math_spec §10, §6.5)."""
    model, x, y = toy()
    N = x.shape[0]
    opt = FOOF(model, lr=1.0, damping=lam_p / N, ema_decay=0.0, inv_period=1, ema_steps=1)
    opt.zero_grad()
    (0.5 * ((model(x) - y) ** 2).sum(1)).mean().backward()
    opt.step()
    torch.testing.assert_close(model.weight[0], torch.tensor(expected, dtype=f64), rtol=1e-7, atol=1e-7)
    if lam_p < 1e-6:  # a single step reaches the global optimum: outputs equal the targets
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-8)


# ---------------------------------------------------------------------- single steps: FOOF
@pytest.mark.parametrize("case", [mlp(True), mlp(False), cnn()], ids=lambda c: c.name)
def test_foof_single_step_dense(case):
    model, x, y = case.model, case.inputs, case.targets
    lr, lam = 0.7, 0.3
    opt = FOOF(model, lr=lr, damping=lam, ema_decay=0.0, inv_period=1, ema_steps=1)
    opt.zero_grad()
    layers, f = run_layers(model, x)
    F.cross_entropy(f, y).backward()  # the same graph the reference inputs come from
    expected = []
    for mod, inp, _ in layers:
        A = A_hat(mod, inp)
        G = grad_matrix(mod)
        P = torch.linalg.inv(A + lam * torch.eye(A.shape[0], dtype=f64))
        expected.append(layer_matrix(mod) - lr * G @ P)
    # the forward above ran through the layer hooks too (the modules are called directly)
    opt.step()
    for (mod, _, _), W in zip(layers, expected):
        torch.testing.assert_close(layer_matrix(mod), W, rtol=1e-10, atol=1e-12)


def test_foof_matches_curvature_structure():
    """The optimizer's step equals ``−lr · curvkit.fisher(structure="foof").solve(grad, λ)``."""
    case = mlp(True)
    model, x, y = case.model, case.inputs, case.targets
    opt = FOOF(model, lr=0.5, damping=0.2, ema_decay=0.0, inv_period=1, ema_steps=1)
    opt.zero_grad()
    loss_backward(model, x, y)
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    Fo = curvkit.fisher(model, x, structure="foof")
    expected = [p.detach() - 0.5 * d for p, d in zip(params, Fo.solve(grads, 0.2))]
    opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- single steps: KFAC
@pytest.mark.parametrize("damping_mode", ["heuristic", "standard"])
@pytest.mark.parametrize("kind", ["exact", "mc"])
@pytest.mark.parametrize("case", [mlp(True), cnn()], ids=lambda c: c.name)
def test_kfac_single_step_dense(case, kind, damping_mode):
    model, x, y = case.model, case.inputs, case.targets
    lr, lam = 0.4, 0.05
    gen = torch.Generator().manual_seed(3)
    ref_gen = torch.Generator().manual_seed(3)
    opt = KFAC(model, lr=lr, damping=lam, kind=kind, damping_mode=damping_mode, ema_decay=0.0,
               inv_period=1, ema_steps=1, generator=gen)
    opt.zero_grad()
    loss_backward(model, x, y)
    layers, f = run_layers(model, x)
    seeds = exact_seeds(f) if kind == "exact" else mc_seeds(f, ref_gen)
    Bs = B_hats(model, x, seeds)
    expected = []
    for (mod, inp, _), B in zip(layers, Bs):
        A, G = A_hat(mod, inp), grad_matrix(mod)
        if damping_mode == "heuristic":
            la, lb = pi_split(A, B, lam)
            D = torch.linalg.solve(B + lb * torch.eye(B.shape[0], dtype=f64), G) @ torch.linalg.inv(
                A + la * torch.eye(A.shape[0], dtype=f64))
        else:
            K = torch.kron(B, A) + lam * torch.eye(A.shape[0] * B.shape[0], dtype=f64)
            D = torch.linalg.solve(K, G.reshape(-1)).reshape(G.shape)
        expected.append(layer_matrix(mod) - lr * D)
    opt.step()
    for (mod, _, _), W in zip(layers, expected):
        torch.testing.assert_close(layer_matrix(mod), W, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("damping_mode", ["heuristic", "standard"])
def test_kfac_matches_curvature_structure(damping_mode):
    case = cnn()
    model, x, y = case.model, case.inputs, case.targets
    opt = KFAC(model, lr=0.5, damping=0.1, kind="exact", damping_mode=damping_mode, ema_decay=0.0,
               inv_period=1, ema_steps=1)
    opt.zero_grad()
    loss_backward(model, x, y)
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    Fk = curvkit.fisher(model, x, kind="exact", structure="kfac")
    mode = "heuristic" if damping_mode == "heuristic" else "exact"
    expected = [p.detach() - 0.5 * d for p, d in zip(params, Fk.solve(grads, 0.1, damping_mode=mode))]
    opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-11)


def test_kfac_standard_is_exact_natural_gradient_where_kfac_is_exact():
    """One Linear layer and one datapoint: KFAC = Fisher, so standard damping gives the exact
    damped natural gradient (dense Fisher from torch.func)."""
    case = single_linear_one_point()
    model, x, y = case.model, case.inputs, case.targets
    opt = KFAC(model, lr=1.0, damping=1e-2, kind="exact", damping_mode="standard", ema_decay=0.0,
               inv_period=1, ema_steps=1)
    opt.zero_grad()
    loss_backward(model, x, y)
    params = list(model.parameters())
    g = torch.cat([p.grad.reshape(-1) for p in params])
    Fd = dense_fisher(model, x, kind="exact")
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    expected = theta - torch.linalg.solve(Fd + 1e-2 * torch.eye(Fd.shape[0], dtype=f64), g)
    opt.step()
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), expected,
                               rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------- single steps: natural gradient
@pytest.mark.parametrize("structure", ["full", "block_diag"])
@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_natural_gradient_same_batch_dense(kind, structure):
    case = mlp(True)
    model, x, y = case.model, case.inputs, case.targets
    lr, lam = 0.3, 0.05
    gen = torch.Generator().manual_seed(5)
    ref_gen = torch.Generator().manual_seed(5)
    opt = NaturalGradient(model, lr=lr, damping=lam, kind=kind, structure=structure,
                          fisher_batch="same", generator=gen)
    opt.zero_grad()
    loss_backward(model, x, y)
    params = list(model.parameters())
    g = torch.cat([p.grad.reshape(-1) for p in params])
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    if kind == "mc":
        with torch.no_grad():
            p = torch.softmax(model(x).to(f64), 1)
        targets = torch.multinomial(p, 1, replacement=True, generator=ref_gen).T
    else:
        targets = y
    Fd = dense_fisher(model, x, targets, kind=kind)
    if structure == "block_diag":  # one block per layer (weight and bias together)
        sizes = [params[0].numel() + params[1].numel(), params[2].numel() + params[3].numel()]
        Fd = dense_block_diagonal(dense_fisher(model, x, targets, kind=kind), sizes)
    expected = theta - lr * torch.linalg.solve(Fd + lam * torch.eye(Fd.shape[0], dtype=f64), g)
    opt.step(targets=y)
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), expected,
                               rtol=1e-8, atol=1e-10)


def test_natural_gradient_independent_uses_previous_batch():
    """Step 1 (``inv_period=1``) solves with the Fisher of step 0's batch at the current θ."""
    case = mlp(True, n=6)
    model, x0, y0 = case.model, case.inputs, case.targets
    x1, y1 = torch.randn(5, 5, dtype=f64), torch.randint(0, 3, (5,))
    opt = NaturalGradient(model, lr=0.2, damping=0.1, kind="exact")
    assert opt.fisher_batch == "independent"
    opt.zero_grad()
    loss_backward(model, x0, y0)
    opt.step()  # step 0: no earlier batch, uses its own
    opt.zero_grad()
    loss_backward(model, x1, y1)
    params = list(model.parameters())
    g = torch.cat([p.grad.reshape(-1) for p in params])
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    Fd = dense_fisher(model, x0, kind="exact")
    expected = theta - 0.2 * torch.linalg.solve(Fd + 0.1 * torch.eye(Fd.shape[0], dtype=f64), g)
    opt.step()
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), expected,
                               rtol=1e-8, atol=1e-10)
    assert opt.counts["fisher_builds"] == 2


def test_natural_gradient_fisher_loader_and_set_fisher_batch():
    case = mlp(True)
    model, x, y = case.model, case.inputs, case.targets
    xf = torch.randn(9, 5, dtype=f64)
    loader = [(xf, torch.zeros(9, dtype=torch.long))]
    opt = NaturalGradient(model, lr=0.2, damping=0.1, kind="exact", inv_period=2, fisher_loader=loader)
    opt.zero_grad()
    loss_backward(model, x, y)
    params = list(model.parameters())
    g = torch.cat([p.grad.reshape(-1) for p in params])
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    Fd = dense_fisher(model, xf, kind="exact")
    expected = theta - 0.2 * torch.linalg.solve(Fd + 0.1 * torch.eye(Fd.shape[0], dtype=f64), g)
    opt.step()
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), expected,
                               rtol=1e-8, atol=1e-10)
    # set_fisher_batch: used at the next refresh (step 2), not before
    opt2 = NaturalGradient(model, lr=0.2, damping=0.1, kind="exact", inv_period=1)
    opt2.set_fisher_batch(xf)
    opt2.zero_grad()
    loss_backward(model, x, y)
    g = torch.cat([p.grad.reshape(-1) for p in params])
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    Fd = dense_fisher(model, xf, kind="exact")
    expected = theta - 0.2 * torch.linalg.solve(Fd + 0.1 * torch.eye(Fd.shape[0], dtype=f64), g)
    opt2.step()
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), expected,
                               rtol=1e-8, atol=1e-10)


def test_natural_gradient_explicit_inputs():
    case = mlp(True)
    model, x, y = case.model, case.inputs, case.targets
    a = NaturalGradient(model, lr=0.2, damping=0.1, kind="exact", fisher_batch="same")
    a.zero_grad()
    loss_backward(model, x, y)
    with torch.no_grad():
        model(torch.randn(3, 5, dtype=f64))  # not recorded (no grad)
    d_recorded = a.direction()
    d_explicit = a.direction(inputs=x)
    for u, v in zip(d_recorded, d_explicit):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


# ---------------------------------------------------------------------- Algorithm 1 schedule
def test_schedule_predicates():
    s = Schedule(inv_period=5, ema_steps=2)
    assert [t for t in range(16) if s.is_stats(t)] == [0, 4, 5, 9, 10, 14, 15]
    assert [t for t in range(16) if s.is_inversion(t)] == [0, 5, 10, 15]
    full = Schedule(inv_period=3, ema_steps=3)
    assert all(full.is_stats(t) for t in range(9))
    one = Schedule(1, 1)
    assert all(one.is_stats(t) and one.is_inversion(t) for t in range(5))


def test_foof_schedule_counts_and_normalised_ema():
    """EMA updates exactly at t mod T ∈ {T−S+1, …, T−1, 0}, inversions at t mod T = 0, the EMA is
    normalised, and plain steps use the latest inverse."""
    torch.manual_seed(0)
    case = mlp(False)
    model = case.model
    T, S, m, lam, lr = 5, 2, 0.5, 0.2, 0.1
    opt = FOOF(model, lr=lr, damping=lam, ema_decay=m, inv_period=T, ema_steps=S)
    batches = [(torch.randn(6, 5, dtype=f64), torch.randint(0, 3, (6,))) for _ in range(12)]
    first = model[0]
    A_batches = []
    for t, (x, y) in enumerate(batches):
        before = dict(opt.counts)
        opt.zero_grad()
        loss_backward(model, x, y)
        recorded = opt.recorder.records.inputs[0] is not None
        assert recorded == (t % T in (0, 4)), t  # hooks record only on statistics steps
        with torch.no_grad():
            A_batches.append(A_hat(first, x))
        if t == 7:  # a plain step uses the inverse built at step 5
            Ahat = (0.125 * A_batches[0] + 0.25 * A_batches[4] + 0.5 * A_batches[5]) / 0.875
            P = torch.linalg.inv(Ahat + lam * torch.eye(5, dtype=f64))
            expected = -lr * first.weight.grad @ P
            torch.testing.assert_close(opt.direction()[0], expected, rtol=1e-10, atol=1e-12)
        opt.step()
        assert opt.counts["ema_updates"] - before["ema_updates"] == int(t % T in (0, 4))
        assert opt.counts["inversions"] - before["inversions"] == int(t % T == 0)
        if t == 5:
            expected = (0.125 * A_batches[0] + 0.25 * A_batches[4] + 0.5 * A_batches[5]) / 0.875
            torch.testing.assert_close(opt.factors()[0]["A"], expected, rtol=1e-12, atol=1e-12)
    assert opt.counts == {"ema_updates": 5, "inversions": 3}
    assert opt.step_count == 12


def test_kfac_extra_backward_only_on_statistics_steps():
    case = mlp(True)
    model = case.model
    opt = KFAC(model, lr=0.01, damping=0.1, inv_period=4, ema_steps=1)
    for t in range(6):
        x, y = torch.randn(5, 5, dtype=f64), torch.randint(0, 3, (5,))
        opt.zero_grad()
        loss_backward(model, x, y)
        assert (opt.errors.errors is not None) == (t % 4 == 0)
        opt.step()
    assert opt.counts == {"ema_updates": 2, "inversions": 2}


def test_initialize_prefills_ema():
    case = mlp(False)
    model = case.model
    m = 0.9
    opt = FOOF(model, lr=0.1, damping=0.1, ema_decay=m, inv_period=10, ema_steps=10)
    xs = [torch.randn(4, 5, dtype=f64) for _ in range(3)]
    assert opt.initialize((x, None) for x in xs) == 3
    A = [A_hat(model[0], x) for x in xs]
    ema = (1 - m) * (m * m * A[0] + m * A[1] + A[2]) / (1 - m ** 3)
    torch.testing.assert_close(opt.factors()[0]["A"], ema, rtol=1e-12, atol=1e-12)
    assert opt.counts == {"ema_updates": 3, "inversions": 1} and opt.step_count == 0
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------- momentum, weight decay, groups
def test_momentum_and_decoupled_weight_decay():
    case = mlp(False)
    model = case.model
    lr, lam, mu, wd = 0.3, 0.5, 0.9, 0.01
    opt = FOOF(model, lr=lr, damping=lam, ema_decay=0.0, inv_period=1, ema_steps=1, momentum=mu,
               weight_decay=wd)
    buf = None
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(6, 5, dtype=f64, generator=g), torch.randint(0, 3, (6,), generator=g)
        opt.zero_grad()
        loss_backward(model, x, y)
        W, G = model[0].weight.detach().clone(), model[0].weight.grad.clone()
        buf = G if buf is None else mu * buf + G
        P = torch.linalg.inv(A_hat(model[0], x) + lam * torch.eye(5, dtype=f64))
        expected = W - lr * wd * W - lr * buf @ P
        opt.step()
        torch.testing.assert_close(model[0].weight.detach(), expected, rtol=1e-10, atol=1e-12)


def test_param_groups_per_group_lr_and_damping():
    case = mlp(True)
    model, x, y = case.model, case.inputs, case.targets
    groups = [{"params": params_of(model[0]), "lr": 0.1, "damping": 0.5},
              {"params": params_of(model[2]), "lr": 0.7, "damping": 0.02}]
    opt = FOOF(model, ema_decay=0.0, inv_period=1, ema_steps=1, params=groups)
    opt.zero_grad()
    layers, f = run_layers(model, x)
    F.cross_entropy(f, y).backward()
    expected = []
    for (mod, inp, _), (lr, lam) in zip(layers, [(0.1, 0.5), (0.7, 0.02)]):
        A = A_hat(mod, inp)
        expected.append(layer_matrix(mod) - lr * grad_matrix(mod) @ torch.linalg.inv(
            A + lam * torch.eye(A.shape[0], dtype=f64)))
    opt.step()
    for (mod, _, _), W in zip(layers, expected):
        torch.testing.assert_close(layer_matrix(mod), W, rtol=1e-10, atol=1e-12)


def test_natural_gradient_block_diag_per_group_damping():
    case = mlp(True)
    model, x, y = case.model, case.inputs, case.targets
    groups = [{"params": params_of(model[0]), "damping": 0.5},
              {"params": params_of(model[2]), "damping": 0.02}]
    opt = NaturalGradient(model, lr=0.3, damping=1.0, kind="exact", structure="block_diag",
                          fisher_batch="same", params=groups)
    opt.zero_grad()
    loss_backward(model, x, y)
    params = list(model.parameters())
    g = torch.cat([p.grad.reshape(-1) for p in params])
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    n0 = params[0].numel() + params[1].numel()
    Fd = dense_block_diagonal(dense_fisher(model, x, kind="exact"), [n0, theta.numel() - n0])
    damp = torch.cat([torch.full((n0,), 0.5, dtype=f64), torch.full((theta.numel() - n0,), 0.02, dtype=f64)])
    expected = theta - 0.3 * torch.linalg.solve(Fd + torch.diag(damp), g)
    opt.step()
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), expected,
                               rtol=1e-8, atol=1e-10)


def test_lr_scheduler():
    """A StepLR schedule gives the same trajectory as changing ``lr`` by hand."""
    trajs = []
    for use_sched in (True, False):
        case = mlp(True)
        model = case.model
        opt = KFAC(model, lr=0.2, damping=0.1, inv_period=2, ema_steps=2,
                   generator=torch.Generator().manual_seed(0))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if use_sched else None
        for t in range(5):
            g = torch.Generator().manual_seed(t)
            x, y = torch.randn(6, 5, dtype=f64, generator=g), torch.randint(0, 3, (6,), generator=g)
            if not use_sched:
                opt.param_groups[0]["lr"] = 0.2 * 0.5 ** (t // 2)
            opt.zero_grad()
            loss_backward(model, x, y)
            opt.step()
            if sched is not None:
                sched.step()
        trajs.append(snapshot(model))
    for a, b in zip(*trajs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- directions
@pytest.mark.parametrize("make", [
    lambda m: FOOF(m, lr=0.3, damping=0.2, inv_period=3, ema_steps=2, momentum=0.5, weight_decay=0.1),
    lambda m: KFAC(m, lr=0.3, damping=0.2, inv_period=3, ema_steps=2, momentum=0.5, weight_decay=0.1),
    lambda m: NaturalGradient(m, lr=0.3, damping=0.2, inv_period=2, momentum=0.5, weight_decay=0.1),
], ids=["foof", "kfac", "natural"])
def test_direction_is_the_step_and_changes_nothing(make):
    case = mlp(True)
    model = case.model
    opt = make(model)
    for t in range(4):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(6, 5, dtype=f64, generator=g), torch.randint(0, 3, (6,), generator=g)
        opt.zero_grad()
        loss_backward(model, x, y)
        before = snapshot(model)
        sd = opt.state_dict()
        gen_state = None if opt.generator is None else opt.generator.get_state()
        d = opt.direction()
        assert all(torch.equal(a, b) for a, b in zip(snapshot(model), before))
        assert opt.step_count == t
        if gen_state is not None:
            assert torch.equal(opt.generator.get_state(), gen_state)
        assert_state_equal(opt.state_dict(), sd)
        opt.step()
        for p, p0, dp in zip(model.parameters(), before, d):
            torch.testing.assert_close(p.detach(), p0 + dp, rtol=1e-12, atol=1e-14)


def assert_state_equal(a, b) -> None:
    """Recursive equality of state dicts (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b), (set(a) ^ set(b))
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_state_equal(u, v)
    else:
        assert a == b, (a, b)


@pytest.mark.parametrize("damping_mode", ["heuristic", "standard"])
def test_kfac_without_second_factor_directions(damping_mode):
    """D.9: ``−η M (Â + λ_A I)⁻¹`` with KFAC's λ_A; ``"lambda_b"`` divides by λ_B; ``"norm"``
    matches the Frobenius norm of KFAC's direction per layer."""
    case = mlp(True)
    model, x, y = case.model, case.inputs, case.targets
    lr, lam = 0.3, 0.05
    opt = KFAC(model, lr=lr, damping=lam, kind="exact", damping_mode=damping_mode, ema_decay=0.0,
               inv_period=1, ema_steps=1)
    opt.zero_grad()
    loss_backward(model, x, y)
    layers, f = run_layers(model, x)
    Bs = B_hats(model, x, exact_seeds(f))
    kfac = opt.direction()
    plain, lb, normed = (opt.direction("foof", r) for r in (None, "lambda_b", "norm"))
    i = 0
    for (mod, inp, _), B in zip(layers, Bs):
        A = A_hat(mod, inp)
        la, lbv = pi_split(A, B, lam)
        D = -lr * grad_matrix(mod) @ torch.linalg.inv(A + la * torch.eye(A.shape[0], dtype=f64))
        got = torch.cat([plain[i].reshape(D.shape[0], -1), plain[i + 1].reshape(-1, 1)], 1)
        torch.testing.assert_close(got, D, rtol=1e-9, atol=1e-12)
        got_lb = torch.cat([lb[i].reshape(D.shape[0], -1), lb[i + 1].reshape(-1, 1)], 1)
        torch.testing.assert_close(got_lb, D / lbv, rtol=1e-9, atol=1e-12)
        n_k = torch.cat([kfac[i].reshape(-1), kfac[i + 1]]).norm()
        n_f = torch.cat([normed[i].reshape(-1), normed[i + 1]]).norm()
        torch.testing.assert_close(n_f, n_k, rtol=1e-10, atol=0)
        got_n = torch.cat([normed[i].reshape(D.shape[0], -1), normed[i + 1].reshape(-1, 1)], 1)
        cos = F.cosine_similarity(got_n.reshape(-1), got.reshape(-1), dim=0)
        assert cos > 1 - 1e-10
        i += 2
    with pytest.raises(ValueError, match="rescale applies to variant='foof' only"):
        opt.direction("kfac", "norm")
    with pytest.raises(ValueError, match="unknown variant 'sgd'"):
        opt.direction("sgd")


# ---------------------------------------------------------------------- dtypes and training
@pytest.mark.parametrize("make", [
    lambda m: FOOF(m, lr=0.3, damping=0.1, inv_period=2, ema_steps=2),
    lambda m: KFAC(m, lr=0.3, damping=0.1, inv_period=2, ema_steps=2),
    lambda m: KFAC(m, lr=0.3, damping=0.1, inv_period=2, ema_steps=2, damping_mode="standard"),
    lambda m: NaturalGradient(m, lr=0.3, damping=0.1),
], ids=["foof", "kfac", "kfac_std", "natural"])
def test_float32_matches_float64(make):
    results = []
    for dtype in (torch.float32, f64):
        case = cnn()
        model = case.model.to(dtype)
        opt = make(model)
        if opt.generator is not None:
            opt.generator.manual_seed(0)
        for t in range(3):
            g = torch.Generator().manual_seed(t)
            x = torch.randn(4, 2, 4, 4, generator=g, dtype=f64).to(dtype)
            y = torch.randint(0, 3, (4,), generator=g)
            opt.zero_grad()
            loss_backward(model, x, y)
            opt.step()
        assert all(p.dtype == dtype for p in model.parameters())
        results.append(snapshot(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)


@functools.cache
def digits():
    return load_digits()


def digits_loss_drop(make, steps: int = 60) -> tuple[float, float]:
    ds = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 10, bias=False))
    opt = make(model)
    X, Y = ds.x_train, ds.y_train
    g = torch.Generator().manual_seed(0)

    def full_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(X), Y))

    start = full_loss()
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (100,), generator=g)
        opt.zero_grad()
        loss_backward(model, X[idx], Y[idx])
        opt.step()
    return start, full_loss()


@pytest.mark.parametrize("make", [
    lambda m: FOOF(m, lr=0.3, damping=1.0, inv_period=10, ema_steps=10),
    lambda m: KFAC(m, lr=0.03, damping=0.01, inv_period=10, ema_steps=10),
    lambda m: KFAC(m, lr=0.1, damping=0.1, damping_mode="standard", inv_period=10, ema_steps=10),
    lambda m: NaturalGradient(m, lr=0.1, damping=0.1),
], ids=["foof", "kfac", "kfac_std", "natural"])
def test_training_lowers_loss_on_digits(make):
    start, end = digits_loss_drop(make)
    assert end < 0.3 * start, (start, end)

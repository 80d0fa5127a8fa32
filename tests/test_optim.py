"""Correctness of curvkit.optim: single steps against dense float64 computations, the toy example
of App. F, momentum/weight decay, groups, schedulers, directions, and training on digits (the
Algorithm 1 schedule: ``test_optim_schedule.py``).

The references here never use curvkit's capture: layer inputs come from running the
``nn.Sequential`` module by module, errors from ``torch.autograd.grad`` on the layer outputs, Fisher
matrices from ``curvkit.testing.dense`` (``torch.func``).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
from curvkit.datasets import load_digits
from curvkit.optim import FOOF, KFAC, NaturalGradient
from curvkit.testing import dense_block_diagonal, dense_fisher
from tests.cases import cnn, mlp, single_linear_one_point
from tests.optim_refs import (
    A_hat,
    B_hats,
    _one_thread,  # noqa: F401  (autouse fixture)
    assert_state_equal,
    exact_seeds,
    f64,
    grad_matrix,
    layer_matrix,
    loss_backward,
    mc_seeds,
    params_of,
    pi_split,
    run_layers,
    snapshot,
)


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
@pytest.mark.parametrize("damping_mode", ["heuristic", "exact"])
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


@pytest.mark.parametrize("damping_mode", ["heuristic", "exact"])
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
    opt = KFAC(model, lr=1.0, damping=1e-2, kind="exact", damping_mode="exact", ema_decay=0.0,
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


# ---------------------------------------------------------------------- momentum, weight decay, groups
def test_momentum_and_decoupled_weight_decay():
    case = mlp(False)
    model = case.model
    lr, lam, mu, wd = 0.3, 0.5, 0.9, 0.01
    # "current": each step's own batch preconditions it (the default "previous" order, pinned in
    # test_optim_schedule.py, would use the previous batch's factors)
    opt = FOOF(model, lr=lr, damping=lam, ema_decay=0.0, inv_period=1, ema_steps=1, momentum=mu,
               weight_decay=wd, precondition_with="current")
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


@pytest.mark.parametrize("damping_mode", ["heuristic", "exact"])
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
    lambda m: KFAC(m, lr=0.3, damping=0.1, inv_period=2, ema_steps=2, damping_mode="exact"),
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
    lambda m: KFAC(m, lr=0.1, damping=0.1, damping_mode="exact", inv_period=10, ema_steps=10),
    lambda m: NaturalGradient(m, lr=0.1, damping=0.1),
], ids=["foof", "kfac", "kfac_std", "natural"])
def test_training_lowers_loss_on_digits(make):
    start, end = digits_loss_drop(make)
    assert end < 0.3 * start, (start, end)

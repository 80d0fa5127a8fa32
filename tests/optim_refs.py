"""Dense float64 references for the optimizer tests (no curvkit capture): layer inputs from
running an ``nn.Sequential`` module by module, errors from ``torch.autograd.grad`` on the layer
outputs, and small helpers shared by the ``test_optim*`` files."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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

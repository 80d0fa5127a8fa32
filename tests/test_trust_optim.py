"""Issue 10 on the optimizer side: compiled models refused, the capture guard at the first factor
update and after a module-structure change, weight sharing in the persistent recorder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
from curvkit.capture import CaptureMismatchError
from curvkit.curvature.kfac import factors_of
from curvkit.optim import FOOF, KFAC, NaturalGradient

D64 = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D64)


def _kfac(model, **kw):
    return KFAC(model, lr=0.1, damping=0.1, kind="exact", ema_decay=0.0, inv_period=1,
                ema_steps=1, **kw)


def _foof(model):
    return FOOF(model, lr=0.1, damping=0.1, ema_decay=0.0, inv_period=1, ema_steps=1)


def _step(opt, model, x):
    opt.zero_grad()
    model(x).logsumexp(1).sum().backward()
    opt.step()


OPTIMIZERS = {
    "kfac": _kfac,
    "foof": _foof,
    "natural": lambda m: NaturalGradient(m, lr=0.1, damping=0.1, kind="exact"),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_model_refused(name):
    model = _mlp()
    with pytest.raises(TypeError, match=r"module '<model>' \(OptimizedModule\) is compiled.*"
                                        r"Construct the optimizer with the eager model"):
        OPTIMIZERS[name](torch.compile(model, backend="eager"))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_guard_fires_at_first_update(name):
    model = _mlp()
    model[0].register_forward_hook(lambda m, a, o: 3 * o)
    opt = OPTIMIZERS[name](model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CaptureMismatchError,
                       match=r"Capture check failed for layer '0' \(Linear\).*relative error"):
        _step(opt, model, torch.randn(4, 4, dtype=D64))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("name", ["kfac", "foof"])
def test_guard_runs_again_after_structure_change(name):
    model = _mlp()
    opt = OPTIMIZERS[name](model)
    x = torch.randn(4, 4, dtype=D64)
    _step(opt, model, x)
    _step(opt, model, x)  # checked once; later steps do not check
    lin = model[2]
    model[2] = nn.Sequential(lin)  # a structure change the capture still fits: no error
    _step(opt, model, x)
    lin.forward = lambda x: F.linear(x, 2 * lin.weight, lin.bias)  # one it does not fit
    with pytest.raises(CaptureMismatchError, match=r"layer '2' \(Linear\)"):
        _step(opt, model, x)
    model[2] = lin
    del lin.forward  # back to the checked structure: no error
    _step(opt, model, x)


def test_guard_is_not_run_each_step():
    model = _mlp()
    opt = _kfac(model)
    x = torch.randn(4, 4, dtype=D64)
    _step(opt, model, x)
    assert not opt.recorder.schedule.due()
    model[0].register_forward_hook(lambda m, a, o: 3 * o)  # hooks are not structure
    _step(opt, model, x)  # not re-checked: the guard's cost is paid once per structure


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 3)
        self.mid = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.mid(h)))


@pytest.mark.parametrize("damping_mode", ["heuristic", "standard"])
def test_kfac_optimizer_with_shared_layer_matches_curvature(damping_mode):
    torch.manual_seed(0)
    model = Shared().to(D64)
    x = torch.randn(6, 4, dtype=D64)
    Fk = factors_of(curvkit.fisher(model, x, structure="kfac"))
    opt = _kfac(model, damping_mode=damping_mode)
    _step(opt, model, x)
    for fac, A, B in zip(opt.factors(), Fk.A, Fk.B):
        torch.testing.assert_close(fac["A"], A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fac["B"], B, rtol=1e-10, atol=1e-12)


def test_foof_optimizer_with_shared_layer_matches_curvature():
    torch.manual_seed(0)
    model = Shared().to(D64)
    x = torch.randn(6, 4, dtype=D64)
    Fk = factors_of(curvkit.fisher(model, x, structure="foof"))
    opt = _foof(model)
    _step(opt, model, x)
    for fac, A in zip(opt.factors(), Fk.A):
        torch.testing.assert_close(fac["A"], A, rtol=1e-10, atol=1e-12)


def test_kfac_optimizer_inplace_step_equals_eager_twin():
    """KFAC on Linear → ReLU(inplace=True): the step equals that of the out-of-place twin."""
    nets = []
    for inplace in (True, False):
        torch.manual_seed(0)
        nets.append(nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 3))
                    .to(D64))
    x = torch.randn(6, 4, dtype=D64)
    for net in nets:
        opt = _kfac(net, generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            _step(opt, net, x)
    for p, q in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_layer_subclass_refused_by_optimizer():
    class Doubled(nn.Linear):
        def forward(self, x):
            return F.linear(x, 2 * self.weight, self.bias)

    with pytest.raises(curvkit.capture.UnsupportedLayerError, match="overrides forward"):
        _kfac(nn.Sequential(Doubled(3, 2)).to(D64))

"""Issue 10 "never silently wrong": in-place activations, custom forwards, compiled models, the
batch dimension, inference mode and train-mode buffers -- each against a dense float64 reference
(torch.func, :mod:`curvkit.testing.dense`) or with a pinned error."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
from curvkit.capture import BatchLayoutError, CaptureMismatchError, UnsupportedLayerError
from curvkit.testing.dense import dense_block_diagonal, dense_fisher

D64 = torch.float64
INPLACE = [nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.SiLU]


def _close(A, B, tol=1e-9):
    err = float((A - B).norm() / B.norm())
    assert err < tol, err


def _layer_sizes(model):
    return [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))]


def _mlp_inplace(act, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), act(inplace=True), nn.Linear(5, 3, bias=bias),
                         act(inplace=True), nn.Linear(3, 3, bias=bias)).to(D64)


def _cnn_inplace(act):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), act(inplace=True),
                         nn.Conv2d(3, 2, 2, bias=False), act(inplace=True), nn.Flatten(),
                         nn.Linear(18, 3)).to(D64)


@pytest.mark.parametrize("act", INPLACE, ids=lambda a: a.__name__)
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_inplace_activation_every_kind_and_structure(act, net):
    model = _mlp_inplace(act) if net == "mlp" else _cnn_inplace(act)
    x = torch.randn(5, 4, dtype=D64) if net == "mlp" else torch.randn(3, 2, 4, 4, dtype=D64)
    y = torch.randint(0, 3, (x.shape[0],))
    sizes = _layer_sizes(model)
    for kind in ("exact", "empirical", "mc"):
        gen = torch.Generator().manual_seed(3)
        F_full = curvkit.fisher(model, x, y, kind=kind, generator=gen)
        ref_targets = y if kind == "empirical" else F_full.captured.sampled
        D = dense_fisher(model, x, ref_targets, kind=kind)
        _close(F_full.to_dense(), D)
        gen = torch.Generator().manual_seed(3)
        Fb = curvkit.fisher(model, x, y, kind=kind, structure="block_diag", generator=gen)
        _close(Fb.to_dense(), dense_block_diagonal(D, sizes))
        gen = torch.Generator().manual_seed(3)
        Fd = curvkit.fisher(model, x, y, kind=kind, structure="diag", generator=gen)
        _close(Fd.diagonal(), D.diagonal())


def _dense_kfac(model, x):
    """Independent KFAC reference (kind exact, classification): Â from torch.func-free forward
    inputs, B̂ = (1/N) Σ_n J_s,nᵀ Λ_n J_s,n with J_s the Jacobian w.r.t. each layer's output,
    taken by torch.func on the model cut at that layer (T = 1 for the MLP)."""
    from curvkit.testing.dense import output_fisher
    layers = [m for m in model if isinstance(m, nn.Linear)]
    out = []
    N = x.shape[0]
    for lin in layers:
        idx = list(model).index(lin)
        head, tail = model[:idx], model[idx + 1:]

        def f_of_s(s, tail=tail):
            return tail(s.unsqueeze(0).clone()).squeeze(0)

        with torch.no_grad():
            a = head(x)
            s = lin(a.clone())
            f = model(x)
        J = torch.func.vmap(torch.func.jacrev(f_of_s))(s)  # (N, C, d_out)
        Lam = output_fisher(f)
        B = torch.einsum("nco,ncd,ndp->op", J, Lam, J) / N
        at = torch.cat([a, torch.ones(N, 1, dtype=D64)], 1)
        A = at.T @ at / N
        out.append(torch.kron(B.contiguous(), A.contiguous()))
    return torch.block_diag(*out)


@pytest.mark.parametrize("act", INPLACE, ids=lambda a: a.__name__)
def test_inplace_activation_kfac(act):
    model = _mlp_inplace(act)
    x = torch.randn(5, 4, dtype=D64)
    K = curvkit.fisher(model, x, structure="kfac").operator.to_dense()  # layer space
    _close(K, _dense_kfac(model, x).detach())


def test_inplace_activation_kfac_optimizer_factor_B():
    from curvkit.optim import KFAC
    model = _mlp_inplace(nn.ReLU)
    twin = _mlp_inplace(nn.ReLU)
    for m in twin:
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(5, 4, dtype=D64)
    facs = []
    for net in (model, twin):
        opt = KFAC(net, lr=0.1, damping=1e-2, kind="exact", ema_decay=0.0, inv_period=1,
                   ema_steps=1)
        opt.zero_grad()
        net(x).logsumexp(1).sum().backward()
        opt.step()
        facs.append(opt.factors())
    for f_inplace, f_ref in zip(*facs):
        _close(f_inplace["B"], f_ref["B"], 1e-12)
        _close(f_inplace["A"], f_ref["A"], 1e-12)


def test_inplace_activation_laplace_glm_predictive():
    from curvkit.laplace import LaplacePosterior
    model = _mlp_inplace(nn.ReLU)
    twin = _mlp_inplace(nn.ReLU)
    for m in twin:
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(6, 4, dtype=D64)
    y = torch.randint(0, 3, (6,))
    preds = []
    for net in (model, twin):
        post = LaplacePosterior(net, x, y, likelihood="classification", structure="full")
        preds.append(post.predictive(x[:3], pred_type="glm", link_approx="probit"))
    torch.testing.assert_close(preds[0], preds[1], rtol=1e-10, atol=1e-12)


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


class StdConv2d(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_linear_subclass_with_own_forward_refused():
    """curvkit.fisher takes such a subclass through the generic route (exact); the optimizers'
    fast rules still refuse it by name."""
    from curvkit.capture import GenericAdapter, find_rules
    from curvkit.optim import FOOF
    model = nn.Sequential(DoubledLinear(4, 3)).to(D64)
    x = torch.randn(3, 4, dtype=D64)
    _close(curvkit.fisher(model, x).to_dense(), dense_fisher(model, x))
    (ad,) = find_rules(model, list(model.parameters()))
    assert isinstance(ad, GenericAdapter) and ad.reason == "subclass of Linear that overrides forward"
    with pytest.raises(UnsupportedLayerError,
                       match=r"Layer '0' \(DoubledLinear\) is a subclass of nn.Linear that overrides "
                             r"forward.*Freeze its parameters"):
        FOOF(model)


def test_conv_subclass_with_own_forward_refused():
    model = nn.Sequential(StdConv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2)).to(D64)
    x = torch.randn(2, 2, 4, 4, dtype=D64)
    _close(curvkit.fisher(model, x).to_dense(), dense_fisher(model, x))


def test_subclass_without_own_forward_is_fine():
    class Named(nn.Linear):
        pass

    model = nn.Sequential(Named(4, 3), nn.Tanh(), nn.Linear(3, 3)).to(D64)
    x = torch.randn(5, 4, dtype=D64)
    _close(curvkit.fisher(model, x).to_dense(), dense_fisher(model, x))


def test_instance_forward_refused():
    """An instance forward goes generic in curvkit.fisher (exact) and is refused by optimizers."""
    import types

    from curvkit.optim import FOOF
    lin = nn.Linear(4, 3).to(D64)
    lin.forward = types.MethodType(lambda self, x: F.linear(x, 2 * self.weight, self.bias), lin)
    model = nn.Sequential(lin)
    x = torch.randn(3, 4, dtype=D64)
    _close(curvkit.fisher(model, x, generic_route="loop").to_dense(), dense_fisher(model, x))
    with pytest.raises(UnsupportedLayerError, match="overrides forward"):
        FOOF(model)


def test_guard_fires_on_broken_rule(monkeypatch):
    """A registered rule that doubles e is caught by the guard, for every structure."""
    from curvkit.capture.layers import LayerAdapter
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D64)
    x = torch.randn(5, 4, dtype=D64)
    original = LayerAdapter.errors
    monkeypatch.setattr(LayerAdapter, "errors", lambda self, g, batch_size=None:
                        2 * original(self, g, batch_size))
    for structure in ("full", "block_diag", "kfac", "diag", "foof"):
        with pytest.raises(CaptureMismatchError,
                           match=r"Capture check failed for layer '0' \(Linear\): the captured "
                                 r"per-sample gradients do not reproduce autograd's gradient on "
                                 r"this batch \(relative error 1, tolerance .*Freeze its "
                                 r"parameters"):
            curvkit.fisher(model, x, structure=structure)
    curvkit.fisher(model, x, check=False)  # the user may switch it off


def test_guard_fires_on_forward_hook_changing_output():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D64)
    model[0].register_forward_hook(lambda m, a, o: 3 * o)
    with pytest.raises(CaptureMismatchError, match=r"layer '0' \(Linear\).*relative error"):
        curvkit.fisher(model, torch.randn(4, 4, dtype=D64))


def test_guard_fires_on_parameter_used_outside_its_layer():
    class Extra(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) + F.linear(x, self.lin.weight)

    model = Extra().to(D64)
    with pytest.raises(CaptureMismatchError, match=r"layer 'lin' \(Linear\)"):
        curvkit.fisher(model, torch.randn(4, 3, dtype=D64))


def test_guard_passes_float32_and_reports():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(8 * 36, 50), nn.ReLU(), nn.Linear(50, 10))
    x = torch.randn(16, 3, 6, 6)
    for kind in ("exact", "mc"):
        F32 = curvkit.fisher(model, x, kind=kind, generator=torch.Generator().manual_seed(0))
        assert max(F32.captured.check.values()) < 1e-4


def test_inference_mode_refused():
    model = nn.Sequential(nn.Linear(3, 2)).to(D64)
    x = torch.randn(3, 3, dtype=D64)
    with torch.inference_mode(), pytest.raises(
            RuntimeError, match=r"cannot capture curvature inside torch.inference_mode\(\).*"
                                r"Call it outside"):
        curvkit.fisher(model, x)
    with torch.inference_mode():
        xi = torch.randn(3, 3, dtype=D64)  # an inference tensor used later is fine
    _close(curvkit.fisher(model, xi).to_dense(), dense_fisher(model, xi.clone()))


@pytest.mark.parametrize("structure", ["full", "kfac", "diag", "foof"])
def test_train_mode_batchnorm_buffers_untouched(structure):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(12, 5), nn.BatchNorm1d(5, momentum=None), nn.Linear(5, 2))
    model = model.to(D64).train()
    params = [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              for p in m.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    warns = pytest.warns(UserWarning, match="train mode") if structure != "foof" \
        else contextlib.nullcontext()
    with warns:
        curvkit.fisher(model, torch.randn(4, 2, 4, 4, dtype=D64), structure=structure,
                       params=params)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert int(after["1.num_batches_tracked"]) == 0


def test_compiled_model_captured_through_eager_module():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).to(D64)
    x = torch.randn(5, 4, dtype=D64)
    cmodel = torch.compile(model, backend="eager")
    cmodel(x)  # compiled first
    D = dense_fisher(model, x)
    _close(curvkit.fisher(cmodel, x).to_dense(), D)
    _close(curvkit.fisher(cmodel, x, structure="kfac").to_dense(),
           curvkit.fisher(model, x, structure="kfac").to_dense(), 1e-12)


def test_compiled_submodule_refused():
    model = nn.Sequential(torch.compile(nn.Linear(4, 5), backend="eager"), nn.ReLU(),
                          nn.Linear(5, 3)).to(D64)
    with pytest.raises(TypeError, match=r"module '0' \(OptimizedModule\) is compiled.*eager"):
        curvkit.fisher(model, torch.randn(3, 4, dtype=D64))


class SeqFirst(nn.Module):
    """Linear layers applied to sequence-first (T, N, d) inputs, output (N, C)."""

    def __init__(self, T):
        super().__init__()
        self.T = T
        self.enc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # x: (N, T, 3)
        h = torch.tanh(self.enc(x.transpose(0, 1)))  # (T, N, 4)
        return self.head(h).sum(0)  # (N, 2)


def test_sequence_first_batch_dim_resolved():
    torch.manual_seed(0)
    model = SeqFirst(3).to(D64)
    x = torch.randn(5, 3, 3, dtype=D64)  # T = 3 != N = 5
    D = dense_fisher(model, x)
    _close(curvkit.fisher(model, x).to_dense(), D)
    _close(curvkit.fisher(model, x, structure="diag").diagonal(), D.diagonal())


def test_sequence_first_with_T_equal_N_refused():
    torch.manual_seed(0)
    model = SeqFirst(4).to(D64)
    x = torch.randn(4, 4, 3, dtype=D64)  # T == N: dimension 0 is taken, the guard objects
    with pytest.raises(CaptureMismatchError,
                       match=r"layer 'enc' \(Linear\).*batch dimension that is not dimension 0"):
        curvkit.fisher(model, x)


def test_layer_without_batch_dimension_refused():
    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.register_buffer("z", torch.randn(7, 3))

        def forward(self, x):
            return x @ self.lin(self.z).sum(0, keepdim=True).T.expand(-1, 2)

    model = Const().to(D64)
    with pytest.raises(BatchLayoutError, match=r"Layer 'lin' \(Linear\) got a input of shape "
                                               r"\(7, 3\) in which the batch size N = 4"):
        curvkit.fisher(model, torch.randn(4, 2, dtype=D64))

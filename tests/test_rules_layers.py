"""Every layer rule and the generic route against dense torch.func float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.capture import GenericAdapter, LayerAdapter, UnsupportedLayerError, find_rules
from curvkit.testing.dense import dense_fisher

f64 = torch.float64


def _blocks_mask(F) -> torch.Tensor:
    sizes = torch.tensor([layer.size for layer in F.layers])
    ids_layer = torch.repeat_interleave(torch.arange(len(F.layers)), sizes)
    ids = torch.empty_like(ids_layer)
    ids[F.index] = ids_layer
    return ids[:, None] == ids[None, :]


def _loop_reference(model, x, targets, likelihood, kind, params):
    """Dense float64 Fisher from per-input ``torch.autograd.functional.jacobian`` (for models
    ``torch.func`` cannot vmap, e.g. PReLU's backward)."""
    params = list(params) if params is not None else [p for p in model.parameters()
                                                      if p.requires_grad]

    def jac(xi):
        def f(*ps):
            names = [n for n, q in model.named_parameters() if any(q is p for p in params)]
            return torch.func.functional_call(model, dict(zip(names, ps)), (xi[None],))[0]
        J = torch.autograd.functional.jacobian(f, tuple(params))
        return torch.cat([j.reshape(j.shape[0], -1) for j in J], 1)

    out = model(x).detach()
    N, C = out.shape
    F = 0
    for n in range(N):
        J = jac(x[n])
        p = torch.softmax(out[n], 0)
        if kind == "exact":
            F = F + J.T @ (torch.diag(p) - p[:, None] * p[None]) @ J
        else:
            ys = targets[:, n] if kind == "mc" else targets[n:n + 1]
            for yy in ys:
                g = J.T @ (p - nn.functional.one_hot(yy, C).to(f64))
                F = F + torch.outer(g, g) / len(ys)
    return F / N


def _check(model, x, y=None, likelihood="classification", kinds=("exact", "mc", "empirical"),
           structures=("full", "block_diag", "diag"), params=None, **kw):
    model = model.double().eval()
    for kind in kinds:
        g = torch.Generator().manual_seed(0)
        F = curvkit.fisher(model, x, y, likelihood=likelihood, kind=kind, generator=g,
                           mc_samples=2, params=params, **kw)
        t = F.captured.sampled if kind == "mc" else y
        try:
            ref = dense_fisher(model, x, t, likelihood=likelihood, kind=kind, params=params)
        except RuntimeError:  # torch.func cannot vmap this model: independent loop reference
            ref = _loop_reference(model, x, t, likelihood, kind, params)
        D = F.to_dense()
        scale = ref.abs().max()
        assert scale > 0
        assert (D - ref).abs().max() <= 1e-10 * scale, (kind, "full")
        v = torch.randn(ref.shape[0], dtype=f64)
        assert torch.allclose(F @ v, ref @ v, atol=1e-10 * scale * v.abs().sum())
        for structure in structures[1:]:
            g = torch.Generator().manual_seed(0)
            S = curvkit.fisher(model, x, y, likelihood=likelihood, kind=kind, generator=g,
                               mc_samples=2, structure=structure, params=params, **kw)
            if structure == "block_diag":
                exp = torch.where(_blocks_mask(S), ref, torch.zeros_like(ref))
                assert (S.to_dense() - exp).abs().max() <= 1e-10 * scale
            elif structure == "diag":
                assert (S.diagonal() - ref.diagonal()).abs().max() <= 1e-10 * scale
    return F


def _xy(*shape, C=3, N=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=f64)
    y = torch.randint(0, C, (shape[0] if N is None else N,), generator=g)
    return x, y


@pytest.mark.parametrize("conv", [
    dict(cls=nn.Conv1d, args=(2, 3, 3), kw=dict(stride=2, padding=1, dilation=1), shape=(3, 2, 7)),
    dict(cls=nn.Conv1d, args=(2, 4, 3), kw=dict(padding="same", dilation=2, padding_mode="circular"),
         shape=(3, 2, 6)),
    dict(cls=nn.Conv1d, args=(2, 4, 2), kw=dict(padding="same", groups=2), shape=(3, 2, 5)),
    dict(cls=nn.Conv2d, args=(2, 3, 3), kw=dict(padding="same", padding_mode="reflect"),
         shape=(3, 2, 4, 4)),
    dict(cls=nn.Conv2d, args=(2, 3, (2, 3)), kw=dict(padding="valid", stride=(1, 2)),
         shape=(3, 2, 4, 5)),
    dict(cls=nn.Conv2d, args=(4, 4, 3), kw=dict(groups=4, padding=1, padding_mode="replicate"),
         shape=(2, 4, 3, 3)),
    dict(cls=nn.Conv2d, args=(4, 6, 2), kw=dict(groups=2, dilation=2, padding=(1, 0)),
         shape=(2, 4, 4, 4)),
    dict(cls=nn.Conv3d, args=(2, 2, 2), kw=dict(stride=(1, 2, 1), padding=1, dilation=(1, 1, 2)),
         shape=(2, 2, 3, 3, 4)),
    dict(cls=nn.ConvTranspose1d, args=(2, 3, 3), kw=dict(stride=2, padding=1, output_padding=1),
         shape=(3, 2, 4)),
    dict(cls=nn.ConvTranspose2d, args=(4, 2, 2), kw=dict(stride=2, groups=2, dilation=1),
         shape=(2, 4, 2, 3)),
    dict(cls=nn.ConvTranspose2d, args=(2, 3, 3), kw=dict(padding=1, dilation=2), shape=(2, 2, 3, 3)),
], ids=lambda c: f"{c['cls'].__name__}-{c['kw']}")
def test_convolutions(conv):
    torch.manual_seed(0)
    layer = conv["cls"](*conv["args"], **conv["kw"])
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x, y = _xy(*conv["shape"])
    model(x.float())
    rules = find_rules(model.double(), list(model.parameters()))
    assert not any(isinstance(r, GenericAdapter) for r in rules)
    _check(model, x, y)
    if layer.groups > 1:
        assert sum(r.module is layer for r in rules) >= layer.groups


@pytest.mark.parametrize("norm, shape", [
    (nn.BatchNorm1d(4), (5, 3)),
    (nn.BatchNorm2d(4), (3, 2, 3, 3)),
    (nn.LayerNorm(4), (3, 2, 3)),
    (nn.LayerNorm(4, bias=False), (3, 3)),
    (nn.GroupNorm(2, 4), (3, 2, 3, 3)),
    (nn.RMSNorm(4), (3, 2, 3)),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_norm_layers(norm, shape):
    torch.manual_seed(0)
    if isinstance(norm, (nn.BatchNorm2d, nn.GroupNorm)):
        model = nn.Sequential(nn.Conv2d(2, 4, 2), norm, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    else:
        model = nn.Sequential(nn.Linear(3, 4), norm, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x, y = _xy(*shape)
    model(x.float())
    if isinstance(norm, nn.BatchNorm1d | nn.BatchNorm2d):  # non-trivial running statistics
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    model.double().eval()
    rules = find_rules(model, list(model.parameters()))
    assert not any(isinstance(r, GenericAdapter) for r in rules)
    _check(model, x, y)
    _check(model, x, torch.randn(shape[0], 3, dtype=f64), likelihood="regression",
           kinds=("exact",), structures=("full", "kfac"))
    F = curvkit.fisher(model.double(), x, y, structure="kfac")
    ref = dense_fisher(model, x, y)
    # a norm layer's KFAC block is its exact block (explicit per-sample gradients, Â = [1])
    mask = _blocks_mask(F)
    ids = [i for i, r in enumerate(F.layers) if not r.kronecker]
    assert ids
    K = F.to_dense()
    inv = torch.empty_like(F.index)
    inv[F.index] = torch.arange(F.index.shape[0])
    start = sum(r.size for r in F.layers[:ids[0]])
    sel = F.index[start:start + F.layers[ids[0]].size]
    assert torch.allclose(K[sel][:, sel], ref[sel][:, sel], atol=1e-12)
    assert mask.any()


def test_batchnorm_train_mode_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(BatchNorm1d\) normalises with batch "
                                                    r"statistics.*model.eval\(\)"):
        curvkit.fisher(model, torch.randn(4, 3, dtype=f64))


class _PlusOneLinear(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, 2 * self.weight, self.bias)


class _SameForwardLinear(nn.Linear):
    pass


def test_generic_route_models():
    torch.manual_seed(0)
    cases = [
        (nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 3)), (4, 3)),
        (nn.Sequential(_PlusOneLinear(3, 4), nn.Tanh(), nn.Linear(4, 3)), (4, 3)),
        (nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(),
                       nn.Linear(4, 3)), (4, 3)),
    ]
    for model, shape in cases:
        x, y = _xy(*shape)
        _check(model, x, y)
        reasons = [r.reason for r in find_rules(model, list(model.parameters()))
                   if isinstance(r, GenericAdapter)]
        assert reasons
    model = nn.Sequential(_SameForwardLinear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    assert not any(isinstance(r, GenericAdapter) for r in find_rules(model, list(model.parameters())))
    sub = find_rules(cases[1][0], list(cases[1][0].parameters()))[0]
    assert sub.reason == "subclass of Linear that overrides forward"


class _Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.rnn(x)[0]
        return self.out(h[:, -1])


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_generic(cell):
    torch.manual_seed(0)
    model = _Recurrent(cell)
    x, y = _xy(3, 4, 3)
    _check(model, x, y, kinds=("exact", "empirical"))


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_attention_generic_and_loop_route():
    torch.manual_seed(0)
    model = _Attn()
    x, y = _xy(3, 2, 4)
    _check(model, x, y, kinds=("exact",))
    F1 = curvkit.fisher(model, x, y, generic_route="loop")
    F2 = curvkit.fisher(model, x, y, generic_route="vmap")
    assert torch.allclose(F1.to_dense(), F2.to_dense(), atol=1e-12)


def test_generic_memory_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 3)).double()
    with pytest.raises(MemoryError, match=r"generic route needs .* GB for 12 per-sample gradient "
                                          r"columns of 4 parameters .*PReLU"):
        curvkit.fisher(model, torch.randn(4, 3, dtype=f64), generic_budget_gb=1e-12)


def test_tied_weights_go_generic():
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Tied()
    x, y = _xy(4, 3)
    rules = find_rules(model, list(model.parameters()))
    assert [r.reason for r in rules if isinstance(r, GenericAdapter)] == ["tied to another module"]
    _check(model, x, y)


def test_foof_refuses_layers_without_kronecker_form():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    with pytest.raises(UnsupportedLayerError, match=r"structure='foof' needs a Kronecker form.*"
                                                    r"'1' \(LayerNorm\).*structure='kfac'"):
        curvkit.fisher(model, torch.randn(3, 3, dtype=f64), structure="foof")


def test_user_rule_registered_and_checked():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return x @ self.weight.T * 0.5

    class ScaledRule(LayerAdapter):
        handles = ("weight",)

        def inputs(self, x, **kw):
            return super().inputs(x * 0.5, **kw)

    model = nn.Sequential(Scaled(), nn.Tanh(), nn.Linear(3, 2))
    x, y = _xy(4, 4, C=2)
    assert isinstance(find_rules(model, list(model.parameters()))[0], GenericAdapter)
    curvkit.capture.register_rule(Scaled, ScaledRule)
    try:
        rules = find_rules(model, list(model.parameters()))
        assert type(rules[0]) is ScaledRule
        _check(model, x, y, kinds=("exact",))
    finally:
        curvkit.capture.unregister_rule(Scaled)
    with pytest.raises(TypeError, match="rule must be a LayerAdapter subclass"):
        curvkit.capture.register_rule(Scaled, object)


def test_linear_conv2d_numbers_unchanged():
    """Linear/Conv2d keep their Kronecker factors (Â from the unfolded patches)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(48, 3)).double()
    x, y = _xy(3, 2, 4, 4)
    F = curvkit.fisher(model, x, y, structure="kfac")
    A = F.operator.factors.A[0]
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2)
    a = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=f64)], 2).reshape(-1, 19)
    # to round-off: curvature/kfac.py folds the 1/N scale into the GEMM
    torch.testing.assert_close(A, 0.5 * ((a.T @ a / 3) + (a.T @ a / 3).T), rtol=1e-13, atol=1e-15)

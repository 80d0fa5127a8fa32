"""Issue 10: weight sharing and tying (per-sample gradient = sum over uses) and activation
checkpointing (recomputation is not a use), for every structure, against dense float64
references (torch.func per-sample gradients/Jacobians, :mod:`curvkit.testing.dense`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import curvkit
from curvkit.capture import CaptureMismatchError, CheckpointError
from curvkit.testing.dense import dense_block_diagonal, dense_fisher, per_sample_jacobians

D64 = torch.float64
STRUCTURES = ("full", "block_diag", "diag", "kfac", "foof")


def _close(A, B, tol=1e-9):
    err = float((A - B).norm() / B.norm())
    assert err < tol, err


class Shared(nn.Module):
    """One Linear called twice (and once on a (N, 2, d) input: uses with different T)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 3)
        self.mid = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        h = self.mid(torch.stack([h, 2 * h], 1)).sum(1)  # second use, T = 2
        return self.out(torch.tanh(h))


class Tied(nn.Module):
    """Two Linear modules holding the same weight and bias (tying)."""

    def __init__(self, bias=True):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=bias)
        self.b = nn.Linear(4, 4, bias=bias)
        self.b.weight = self.a.weight
        if bias:
            self.b.bias = self.a.bias
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.relu(self.a(x)))))


class TiedConv(nn.Module):
    """Two Conv2d with one weight but different strides/padding."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(2, 2, 3, stride=2, bias=False)
        self.c2.weight = self.c1.weight
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        h = self.c2(torch.tanh(self.c1(x)))  # (N, 2, 1, 1) from 4×4
        return self.head(h.flatten(1))


def _layer_blocks(model, layers):
    """Block sizes of the layer structure in parameter order (one block per distinct layer)."""
    return [sum(p.numel() for p in dict.fromkeys(
        [q for q in (getattr(l.module, "weight", None), getattr(l.module, "bias", None))
         if q is not None and q.requires_grad])) for l in layers]


def _kfac_reference(model, x, layers):
    """Dense KFAC in layer space with the uses-as-locations convention: Â = (1/N) Σ_n Σ_t ã ãᵀ
    over the locations of all uses, B̂ = (1/T) Σ_n J_s,nᵀ Λ_n J_s,n where J_s is the Jacobian of f
    w.r.t. the (concatenated) layer outputs, taken by torch.func through a perturbation added
    to every use's output (an independent route to the errors)."""
    from curvkit.testing.dense import output_fisher
    blocks = []
    for layer in layers:
        mods = layer.modules
        outs, ins, called = [], [], []

        def keep(m, a, o, ins=ins, called=called, outs=outs):
            ins.append(a[0].detach())
            called.append(m)
            outs.append(o.detach())

        hooks = [m.register_forward_hook(keep) for m in mods]
        with torch.no_grad():
            f = model(x)
        for h in hooks:
            h.remove()
        N = x.shape[0]
        # perturbation route: f(x; s + δ) with δ added to each use's output
        shapes = [o.shape for o in outs]

        def f_delta(deltas, xi, mods=mods):
            it = iter(deltas)
            hs = [m.register_forward_hook(lambda _m, _a, out, it=it: out + next(it)) for m in mods]
            try:
                return model(xi.unsqueeze(0)).squeeze(0)
            finally:
                for h in hs:
                    h.remove()

        zeros = [torch.zeros(s[1:], dtype=D64) for s in shapes]
        J = torch.func.vmap(torch.func.jacrev(f_delta), in_dims=(None, 0))(zeros, x)
        Lam = output_fisher(f)
        # per use: (N, C, *out) -> (N, C, T_u, d_out)
        Js, As = [], []
        for Ju, xin, m in zip(J, ins, called, strict=True):
            if isinstance(m, nn.Conv2d):
                Js.append(Ju.reshape(N, Ju.shape[1], Ju.shape[2], -1).transpose(2, 3))
                p = torch.nn.functional.unfold(xin, m.kernel_size, m.dilation, m.padding, m.stride)
                As.append(p.transpose(1, 2))
            else:
                Js.append(Ju.reshape(N, Ju.shape[1], -1, Ju.shape[-1]))
                As.append(xin.reshape(N, -1, xin.shape[-1]))
        Jt, At = torch.cat(Js, 2), torch.cat(As, 1)
        if layer.bias:
            At = torch.cat([At, torch.ones(*At.shape[:2], 1, dtype=D64)], 2)
        T = Jt.shape[2]
        B = torch.einsum("ncto,ncd,ndtp->op", Jt, Lam, Jt) / (N * T)
        A = torch.einsum("ntd,nte->de", At, At) / N
        blocks.append(torch.kron(B.contiguous(), A.contiguous()))
    return torch.block_diag(*blocks)


CASES = {
    "shared": lambda: (Shared(), torch.randn(5, 4, dtype=D64)),
    "tied": lambda: (Tied(), torch.randn(5, 4, dtype=D64)),
    "tied_nobias": lambda: (Tied(bias=False), torch.randn(5, 4, dtype=D64)),
    "tied_conv": lambda: (TiedConv(), torch.randn(3, 2, 4, 4, dtype=D64)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharing_and_tying_every_structure(case):
    torch.manual_seed(0)
    model, x = CASES[case]()
    model = model.to(D64)
    F = curvkit.fisher(model, x)
    D = dense_fisher(model, x)
    _close(F.to_dense(), D)
    layers = F.layers
    Fb = curvkit.fisher(model, x, structure="block_diag")
    Db = dense_block_diagonal(D[F.index][:, F.index], [l.size for l in layers])
    _close(Fb.operator.to_dense(), Db)
    _close(curvkit.fisher(model, x, structure="diag").diagonal(), D.diagonal())
    K = curvkit.fisher(model, x, structure="kfac")
    _close(K.operator.to_dense(), _kfac_reference(model, x, layers))
    # the parameter count of the operator is that of the distinct parameters
    assert K.shape[0] == sum(p.numel() for p in model.parameters())


def test_tied_parameter_counted_once():
    model = Tied().to(D64)
    F = curvkit.fisher(model, torch.randn(4, 4, dtype=D64))
    assert len(F.layers) == 2
    assert F.layers[0].describe() == "'a' (Linear, tied with 'b')"
    assert F.shape[0] == 4 * 4 + 4 + 4 * 3 + 3


def test_tie_between_embedding_and_linear_refused():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids).mean(1))

    # a tie between different layer types takes the generic torch.func route (exact)
    model, ids = LM().to(D64), torch.randint(0, 7, (3, 5))
    _close(curvkit.fisher(model, ids).to_dense(), dense_fisher(model, ids))


def test_tie_with_different_trainable_biases_refused():
    model = Tied().to(D64)
    model.b.bias = nn.Parameter(torch.zeros(4, dtype=D64))
    x = torch.randn(3, 4, dtype=D64)  # the tied weight goes generic, the biases keep the rule
    _close(curvkit.fisher(model, x).to_dense(), dense_fisher(model, x))


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.block = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 5),
                                   nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        if self.reentrant is None:  # the plain twin
            return self.head(self.block(x))
        h = checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_activation_checkpointing(structure, reentrant):
    torch.manual_seed(0)
    model = Checkpointed(reentrant).to(D64)
    x = torch.randn(5, 4, dtype=D64, requires_grad=reentrant)  # reentrant needs a grad input
    model.head.weight.grad = torch.ones_like(model.head.weight)
    F = curvkit.fisher(model, x, structure=structure)
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))  # untouched
    assert x.grad is None and all(p.grad is None for p in model.block.parameters())
    model_plain = Checkpointed(None).to(D64)
    model_plain.load_state_dict(model.state_dict())
    R = curvkit.fisher(model_plain, x.detach(), structure=structure)
    _close(F.to_dense(), R.to_dense(), 1e-12)
    if structure == "full":
        _close(F.to_dense(), dense_fisher(model_plain, x.detach()))


def test_reentrant_checkpoint_guarded(monkeypatch):
    from curvkit.capture.layers import LayerAdapter
    model = Checkpointed(True).to(D64)
    x = torch.randn(4, 4, dtype=D64, requires_grad=True)
    original = LayerAdapter.errors
    monkeypatch.setattr(LayerAdapter, "errors", lambda self, g, batch_size=None:
                        2 * original(self, g, batch_size))
    with pytest.raises(CaptureMismatchError, match=r"layer 'block.0' \(Linear\)"):
        curvkit.fisher(model, x)


def test_reentrant_checkpoint_refused_by_optimizer():
    from curvkit.optim import KFAC
    model = Checkpointed(True).to(D64)
    opt = KFAC(model, lr=0.1, damping=0.1)
    x = torch.randn(4, 4, dtype=D64, requires_grad=True)
    with pytest.raises(CheckpointError, match=r"Layer 'block.0' \(Linear\) ran with gradients "
                                              r"disabled.*use_reentrant=False"):
        model(x)
    assert opt.step_count == 0


def test_dense_reference_sanity_for_shared_layer():
    """The reference itself: J from torch.func equals finite differences on a shared layer."""
    torch.manual_seed(0)
    model = Shared().to(D64)
    x = torch.randn(2, 4, dtype=D64)
    J = per_sample_jacobians(model, x)
    p = model.mid.weight
    off = sum(q.numel() for q in [model.inp.weight, model.inp.bias])
    eps = 1e-6
    with torch.no_grad():
        p[0, 0] += eps
        up = model(x)
        p[0, 0] -= 2 * eps
        down = model(x)
        p[0, 0] += eps
    torch.testing.assert_close(J[:, :, off], (up - down) / (2 * eps), rtol=1e-6, atol=1e-8)

"""implicit_grad over data: per-batch losses over a batch or an iterable of batches equal the
closures on the concatenated batch (union semantics, float64); every solve through linalg."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvkit
from curvkit.hypergrad import implicit_grad

D64 = torch.float64


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(10, 3, dtype=D64, generator=g), torch.randn(10, 2, dtype=D64, generator=g)
    Xv, Yv = torch.randn(7, 3, dtype=D64, generator=g), torch.randn(7, 2, dtype=D64, generator=g)
    phi = torch.tensor([0.3, 0.1], dtype=D64, requires_grad=True)  # per-layer weight decay
    params = list(model.parameters())

    def reg() -> torch.Tensor:
        return 0.5 * (phi[0] * (params[0] ** 2).sum() + phi[1] * (params[2] ** 2).sum())

    def inner_batch(x, y):  # the batch mean NLL (unit-variance Gaussian) + the regulariser
        return 0.5 * ((model(x) - y) ** 2).sum(1).mean() + reg()

    def outer_batch(x, y):
        return Fn.mse_loss(model(x), y) + 0.01 * phi.sum()

    return model, params, phi, (X, Y), (Xv, Yv), inner_batch, outer_batch


def _loader(X, Y, bs):
    return DataLoader(TensorDataset(X, Y), batch_size=bs)  # uneven last batch


@pytest.mark.parametrize("curvature,method", [("hessian", "dense"), ("hessian", "cg"),
                                              ("fisher", "auto"), ("fisher", "dense")])
def test_loaders_equal_the_concatenated_batch(curvature, method):
    model, params, phi, (X, Y), (Xv, Yv), inner, outer = _problem()
    if curvature == "fisher":
        curv = curvkit.fisher(model, X, Y, likelihood="regression", kind="exact")
        damping = [phi[0].detach(), 0.05, phi[1].detach(), 0.05]  # per-parameter: PCG route
    else:
        curv, damping = "hessian", 1.0  # θ is not a minimum: damping makes H + D definite
    kw = dict(curvature=curv, damping=damping, method=method, return_info=True)
    ref, ref_info = implicit_grad(lambda: inner(X, Y), lambda: outer(Xv, Yv), params, [phi], **kw)
    got, info = implicit_grad(inner, outer, params, [phi], inner_data=_loader(X, Y, 4),
                              outer_data=[(Xv[:3], Yv[:3]), (Xv[3:], Yv[3:])], progress=False,
                              **kw)
    assert info["method"] == ref_info["method"]
    assert ref[0].abs().max() > 1e-3
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    for v, v_ref in zip(info["v"], ref_info["v"]):
        torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)


def test_union_fisher_over_the_same_loader_and_single_batches():
    """``curvkit.fisher`` over the loader is the Fisher of the union too; a single ``(x, y)``
    batch gives the closure's numbers exactly."""
    model, params, phi, (X, Y), (Xv, Yv), inner, outer = _problem()
    F = curvkit.fisher(model, X, Y, likelihood="regression", kind="exact")
    F_loader = curvkit.fisher(model, _loader(X, Y, 3), likelihood="regression", kind="exact",
                              progress=False)
    ref = implicit_grad(lambda: inner(X, Y), lambda: outer(Xv, Yv), params, [phi], curvature=F,
                        damping=0.2)
    got = implicit_grad(inner, outer, params, [phi], curvature=F_loader, damping=0.2,
                        inner_data=_loader(X, Y, 3), outer_data=_loader(Xv, Yv, 5),
                        progress=False)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    one = implicit_grad(inner, outer, params, [phi], curvature=F, damping=0.2, inner_data=(X, Y),
                        outer_data=(Xv, Yv))
    torch.testing.assert_close(one[0], ref[0], rtol=0, atol=0)


def test_data_errors():
    model, params, phi, (X, Y), (Xv, Yv), inner, outer = _problem()
    F = curvkit.fisher(model, X, Y, likelihood="regression", kind="exact")
    with pytest.raises(ValueError, match="the data of inner_loss yielded no batch"):
        implicit_grad(inner, outer, params, [phi], curvature=F, inner_data=iter(()),
                      outer_data=(Xv, Yv))
    with pytest.raises(ValueError, match=r"outer_loss\(inputs, targets\) must return a scalar"):
        implicit_grad(inner, lambda x, y: model(x), params, [phi], curvature=F,
                      inner_data=(X, Y), outer_data=(Xv, Yv))
    with pytest.raises(TypeError, match=r"inner_loss must be a callable with arguments "
                                        r"\(inputs, targets\)"):
        implicit_grad(None, outer, params, [phi], curvature=F, inner_data=(X, Y))


def test_indefinite_dense_hessian_is_refused_by_the_linalg_solve():
    """The dense route is linalg's damped Cholesky: a saddle (indefinite Hessian) raises."""
    w = torch.tensor([0.5, -0.2], dtype=D64, requires_grad=True)
    phi = torch.tensor([1.0], dtype=D64, requires_grad=True)
    from curvkit.linalg import SingularError

    with pytest.raises(SingularError, match=r"Hessian \+ damping \(P = 2\) is not positive definite.*"
                                             r"singular.*minimum of inner_loss"):
        implicit_grad(lambda: phi[0] * (w[0] ** 2 - w[1] ** 2), lambda: (w ** 2).sum(), [w],
                      [phi], curvature="hessian", damping=0.0, method="dense")

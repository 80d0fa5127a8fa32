"""LaplacePosterior, EWC and validate over loaders equal the concatenated single batch (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvkit
from curvkit.ewc import EWC
from curvkit.laplace import LaplacePosterior


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data(n: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, dtype=torch.float64, generator=g),
            torch.randint(0, 3, (n,), generator=g))


def loader(X, y, bs):
    return DataLoader(TensorDataset(X, y), batch_size=bs)


@pytest.mark.parametrize("structure,route", [("full", "auto"), ("full", "primal"),
                                             ("block_diag", "auto"), ("kfac", "auto"),
                                             ("diag", "auto")])
def test_laplace_over_loader_equals_single_batch(structure, route):
    model = mlp()
    X, y = data(11)
    Xt, _ = data(5, seed=4)
    ref = LaplacePosterior(model, X, y, structure=structure, prior_precision=0.5)
    post = LaplacePosterior(model, loader(X, y, 4), structure=structure, prior_precision=0.5,
                            route=route, progress=False)
    assert post.num_data == 11 and post.batch_size == 11
    torch.testing.assert_close(post.log_marginal_likelihood(), ref.log_marginal_likelihood(),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(post.log_marginal_likelihood(2.0), ref.log_marginal_likelihood(2.0),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(post.marginal_variance(), ref.marginal_variance(), rtol=1e-9,
                               atol=1e-12)
    p_ref = ref.predictive(Xt)
    p = post.predictive(loader(Xt, torch.zeros(5, dtype=torch.long), 2))
    torch.testing.assert_close(p, p_ref, rtol=1e-9, atol=1e-12)
    s = post.sample(200000 // 1000, generator=torch.Generator().manual_seed(0))
    assert s.shape == (200, 43) and torch.isfinite(s).all()
    d1 = post.optimize_prior_precision()
    d0 = ref.optimize_prior_precision()
    assert d1 == pytest.approx(d0, rel=1e-6)


def test_laplace_loader_gridsearch_and_regression_predictive():
    model = mlp()
    X, y = data(9)
    Xv, yv = data(6, seed=5)
    ref = LaplacePosterior(model, X, y)
    post = LaplacePosterior(model, [(X[:5], y[:5]), (X[5:], y[5:])], progress=False)
    grid = [0.1, 1.0, 10.0]
    a = ref.optimize_prior_precision("gridsearch", val_inputs=Xv, val_targets=yv, grid=grid)
    b = post.optimize_prior_precision("gridsearch", val_inputs=loader(Xv, yv, 4), grid=grid)
    assert a == b
    reg = LaplacePosterior(model, X, torch.zeros(9, 3, dtype=torch.float64), likelihood="regression")
    mean, cov = reg.predictive([(Xv[:3],), (Xv[3:],)])
    m0, c0 = reg.predictive(Xv)
    torch.testing.assert_close(mean, m0)
    torch.testing.assert_close(cov, c0)


def test_laplace_dict_inputs_and_nn_predictive():
    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, features):
            return self.net(features)

    model = Kw()
    X, y = data(8)
    ref = LaplacePosterior(model.net, X, y)
    post = LaplacePosterior(model, {"features": X, "labels": y})
    torch.testing.assert_close(post.log_marginal_likelihood(), ref.log_marginal_likelihood(),
                               rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(1)
    p = post.predictive({"features": X[:3]}, pred_type="nn", n_samples=4, generator=g)
    g = torch.Generator().manual_seed(1)
    torch.testing.assert_close(p, ref.predictive(X[:3], pred_type="nn", n_samples=4, generator=g))


def test_laplace_evidence_needs_reiterable_data():
    model = mlp()
    X, y = data(6)
    post = LaplacePosterior(model, ((X[i:i + 3], y[i:i + 3]) for i in (0, 3)), progress=False)
    with pytest.raises(ValueError, match=r"the evidence pass over the data saw 0 inputs but the "
                                         r"Fisher 6; pass a re-iterable"):
        post.log_marginal_likelihood()


def test_interrupted_laplace_fit_leaves_model_as_it_was():
    model = mlp()
    X, y = data(6)
    before = [p.detach().clone() for p in model.parameters()]

    def batches():
        yield X[:3], y[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        LaplacePosterior(model, batches(), progress=False)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None and torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("structure", ["full", "kfac", "diag"])
def test_ewc_consolidate_over_loader(structure):
    model = mlp()
    X, y = data(10)
    ref, ewc = EWC(model, structure=structure), EWC(model, structure=structure)
    ref.consolidate(X, y)
    ewc.consolidate(loader(X, y, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    torch.testing.assert_close(ewc.penalty(), ref.penalty(), rtol=1e-10, atol=1e-12)


def test_validate_compare_over_loader():
    model = mlp()
    X, y = data(10)
    ref = curvkit.validate.compare(model, X, y, structures=("kfac", "diag"))
    rep = curvkit.validate.compare(model, loader(X, y, 4), structures=("kfac", "diag"))
    assert rep.settings["num_data"] == 10
    for a, b in zip(ref.rows, rep.rows):
        assert a.structure == b.structure
        assert a.direction_cosine == pytest.approx(b.direction_cosine, rel=1e-9)
        assert a.matrix_error == pytest.approx(b.matrix_error, rel=1e-9)

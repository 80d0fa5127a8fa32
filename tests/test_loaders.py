"""Iterables of batches: the Fisher of the union equals the Fisher of the concatenated batch.

Every structure, float64, exact and empirical kinds, uneven batch sizes, both Woodbury routes;
batch formats (tuples, dicts, DataLoader batches); subsampling, the column budget, progress bars
and an interrupted fit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvkit

STRUCTS = ("full", "block_diag", "kfac", "foof", "diag")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def convnet() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 3 * 3, 3)).double()


def data(n: int = 10, shape=(4,)):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(n, *shape, dtype=torch.float64, generator=g),
            torch.randint(0, 3, (n,), generator=g))


def chunks(X, y, sizes=(3, 5, 2)):
    out, i = [], 0
    for s in sizes:
        out.append((X[i:i + s], y[i:i + s]))
        i += s
    return out


def dense(F) -> torch.Tensor:
    return F.to_dense().to(torch.float64)


@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_union_equals_concatenated_batch(structure, kind):
    model = mlp()
    X, y = data()
    ref = curvkit.fisher(model, X, y, kind=kind, structure=structure)
    F = curvkit.fisher(model, chunks(X, y), kind=kind, structure=structure, progress=False)
    assert F.num_data == 10
    torch.testing.assert_close(dense(F), dense(ref), rtol=1e-10, atol=1e-12)
    v = torch.randn(F.shape[0], dtype=torch.float64)
    torch.testing.assert_close(F.solve(v, 0.1), ref.solve(v, 0.1), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(F.logdet(0.1), ref.logdet(0.1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("structure", STRUCTS)
def test_union_conv_dataloader(structure):
    """Locations T > 1 (KFC convention), a DataLoader with an uneven last batch."""
    model = convnet()
    X, y = data(7, (1, 3, 3))
    loader = DataLoader(TensorDataset(X, y), batch_size=3)
    ref = curvkit.fisher(model, X, y, structure=structure)
    F = curvkit.fisher(model, loader, structure=structure, progress=False)
    torch.testing.assert_close(dense(F), dense(ref), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["full", "block_diag"])
@pytest.mark.parametrize("route", ["primal", "dual"])
def test_union_routes(structure, route):
    model = mlp()
    X, y = data(30)
    ref = curvkit.fisher(model, X, y, structure=structure)
    F = curvkit.fisher(model, chunks(X, y, (10, 7, 13)), structure=structure, route=route,
                       progress=False)
    torch.testing.assert_close(dense(F), dense(ref), rtol=1e-10, atol=1e-12)
    assert (F.captured is None) == (route == "primal")
    if route == "dual":  # the union capture: columns of all data, errors at 1/√N
        for a, e, a0, e0 in zip(F.captured.a, F.captured.e, ref.captured.a, ref.captured.e):
            torch.testing.assert_close(a, a0)
            torch.testing.assert_close(e, e0, rtol=1e-12, atol=1e-14)


def test_union_auto_switches_to_primal_when_columns_reach_P():
    model = mlp()  # P = 43, R = 3 columns per datum
    X, y = data(40)
    F = curvkit.fisher(model, chunks(X, y, (5, 20, 15)), progress=False)
    assert F.captured is None and F.info["route"] == "primal"
    torch.testing.assert_close(dense(F), dense(curvkit.fisher(model, X, y)), rtol=1e-10,
                               atol=1e-12)


def test_generators_lists_dicts_and_mc_reproducible():
    model = mlp()
    X, y = data()
    batches = [{"input": X[:4], "labels": y[:4]}, {"input": X[4:], "labels": y[4:]}]

    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, input):  # noqa: A002 - keyword name as in HF models
            return self.net(input)

    ref = curvkit.fisher(model, X, y, kind="empirical", structure="kfac")
    F = curvkit.fisher(Kw(), (b for b in batches), kind="empirical", structure="kfac",
                       progress=False)
    torch.testing.assert_close(dense(F), dense(ref), rtol=1e-10, atol=1e-12)
    mc = [curvkit.fisher(model, chunks(X, y), kind="mc", generator=torch.Generator().manual_seed(5),
                         progress=False) for _ in range(2)]
    torch.testing.assert_close(dense(mc[0]), dense(mc[1]))


def test_subsample_keeps_k_data_at_random_and_reproducibly():
    model = mlp()
    X, y = data(30)
    kw = dict(kind="empirical", subsample=6, progress=False)
    F1 = curvkit.fisher(model, chunks(X, y, (10, 7, 13)), **kw,
                        subsample_generator=torch.Generator().manual_seed(0))
    F2 = curvkit.fisher(model, chunks(X, y, (10, 7, 13)), **kw,
                        subsample_generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dense(F1), dense(F2))
    assert F1.num_data == 6 and F1.info == {"rank": 6, "num_seen": 30, "subsample": 6,
                                            "num_loss_terms": 30}
    with torch.no_grad():
        out = model(X)
    rows = [int((out - o).abs().sum(1).argmin()) for o in F1.captured.outputs]
    assert len(set(rows)) == 6 and rows != list(range(6))
    ref = curvkit.fisher(model, X[rows], y[rows], kind="empirical")
    torch.testing.assert_close(dense(F1), dense(ref), rtol=1e-10, atol=1e-12)
    everything = curvkit.fisher(model, chunks(X, y, (10, 7, 13)), kind="empirical", subsample=50,
                                subsample_generator=torch.Generator(), progress=False)
    torch.testing.assert_close(dense(everything), dense(curvkit.fisher(model, X, y, kind="empirical")),
                               rtol=1e-10, atol=1e-12)


def test_column_budget_error_states_gb():
    model = mlp()
    X, y = data(30)
    with pytest.raises(MemoryError, match=r"30 data \(90 columns.*need about 0\.00 GB, over the "
                                          r"budget of 0\.00 GB \(column_budget_gb\). Pass subsample=k"):
        curvkit.fisher(model, DataLoader(TensorDataset(X, y), batch_size=10), route="dual",
                       column_budget_gb=1e-6, progress=False)


def test_union_errors():
    model = mlp()
    X, y = data()
    with pytest.raises(ValueError, match="targets=... goes with a single batch"):
        curvkit.fisher(model, chunks(X, y), y, progress=False)
    with pytest.raises(ValueError, match="yielded no batch"):
        curvkit.fisher(model, iter([]), progress=False)
    with pytest.raises(ValueError, match="subsample=k needs subsample_generator"):
        curvkit.fisher(model, chunks(X, y), subsample=3, progress=False)
    with pytest.raises(ValueError, match="for structure='full' or 'block_diag' only"):
        curvkit.fisher(model, chunks(X, y), structure="kfac", subsample=3,
                       subsample_generator=torch.Generator(), progress=False)
    class MeanOverT(nn.Module):
        def forward(self, x):
            return x.mean(1)

    seq = nn.Sequential(nn.Linear(4, 3), MeanOverT()).double()
    ragged = [(torch.randn(2, 3, 4).double(), torch.zeros(2, dtype=torch.long)),
              (torch.randn(2, 5, 4).double(), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\) has inputs of shape \(T, d_in\) = "
                                         r"\(3, 5\) in an earlier batch and \(5, 5\) now.*pad"):
        curvkit.fisher(seq, ragged, route="dual", progress=False)
    kfac = curvkit.fisher(seq, ragged, structure="kfac", progress=False)  # any shapes
    assert kfac.num_data == 4
    with pytest.raises(NotImplementedError, match="has no union over several batches"):
        @curvkit.register_structure("test_only_dense")
        def _dense(ctx, **options):
            return curvkit.linalg.Dense(torch.eye(43, dtype=torch.float64))
        curvkit.fisher(model, chunks(X, y), structure="test_only_dense", progress=False)


def test_progress_bar_on_by_default_for_loaders(capsys):
    model = mlp()
    X, y = data()
    curvkit.fisher(model, chunks(X, y), structure="diag")
    assert "curvkit.fisher[diag]" in capsys.readouterr().err
    curvkit.fisher(model, chunks(X, y), structure="diag", progress=False)
    curvkit.fisher(model, X, y, structure="diag")
    assert capsys.readouterr().err == ""


def test_interrupted_fit_leaves_model_and_hooks_as_they_were():
    model = mlp()
    X, y = data()
    before = [p.detach().clone() for p in model.parameters()]

    def batches():
        yield X[:5], y[:5]
        raise KeyboardInterrupt

    for structure in STRUCTS:
        with pytest.raises(KeyboardInterrupt):
            curvkit.fisher(model, batches(), structure=structure, progress=False)
        for m in model.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

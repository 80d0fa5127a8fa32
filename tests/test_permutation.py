"""The parameter ↔ layer-space permutation of a Curvature (slice runs vs the plain gather)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
import curvkit.curvature.permutation as permutation
from curvkit.curvature.permutation import LayerPermutation

SHAPES = [torch.Size([3, 4]), torch.Size([5]), torch.Size([2, 2, 2]), torch.Size([7])]
P = sum(s.numel() for s in SHAPES)


def random_parts(g: torch.Generator, blocks: bool):
    """A random layout: a block permutation (slices and index tensors mixed) or a free one."""
    if not blocks:
        perm = torch.randperm(P, generator=g)
        return [perm[:10], perm[10:]]
    cuts = sorted(set(torch.randint(1, P, (4,), generator=g).tolist()))
    bounds = [0, *cuts, P]
    pieces = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    order = torch.randperm(len(pieces), generator=g).tolist()
    return [pieces[i] if torch.rand(1, generator=g) < 0.5 else torch.arange(*pieces[i]) for i in order]


@pytest.mark.parametrize("min_run", [1, 256])
@pytest.mark.parametrize("blocks", [True, False])
def test_layouts_agree_with_the_gather(monkeypatch, min_run, blocks):
    monkeypatch.setattr(permutation, "MIN_RUN", min_run)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        parts = random_parts(g, blocks)
        L = LayerPermutation(parts, SHAPES, torch.device("cpu"))
        idx = torch.cat([torch.arange(*p) if isinstance(p, tuple) else p for p in parts])
        assert torch.equal(L.index, idx)
        X = torch.randn(P, 3, generator=g)
        assert torch.equal(L.to_layer(X), X[idx])
        assert torch.equal(L.from_layer(X[idx]), X)
        assert torch.equal(L.from_layer(X[idx].T.contiguous().T), X)  # column-major input
        if L.direct_lists:
            v = [torch.randn(s, generator=g) for s in SHAPES]
            flat = torch.cat([t.reshape(-1) for t in v])[:, None]
            assert torch.equal(L.list_to_layer(v), flat[idx])
            back = L.layer_to_list(flat[idx])
            assert all(torch.equal(a, b) for a, b in zip(back, v))


def test_fragmented_layouts_keep_the_gather():
    perm = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))
    L = LayerPermutation([perm], [torch.Size([10_000])], torch.device("cpu"))
    assert L.runs is None and not L.direct_lists
    X = torch.randn(10_000, 2)
    torch.testing.assert_close(L.from_layer(L.to_layer(X)), X, rtol=0, atol=0)


def test_runs_merge_adjacent_slices():
    L = LayerPermutation([(10, 20), (20, 27), (0, 10)], [torch.Size([27])], torch.device("cpu"))
    assert L.runs == [(10, 0, 17), (0, 17, 10)]


class BiasLast(nn.Module):
    """Conv (no bias) then BatchNorm then a Linear with bias: layer order ≠ parameter order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).flatten(1))


@pytest.fixture
def F(monkeypatch):
    """The exact full Fisher of :class:`BiasLast` on the run route (layout ≠ parameter order)."""
    monkeypatch.setattr(permutation, "MIN_RUN", 1)  # this tiny model: the run route
    torch.manual_seed(0)
    model = BiasLast().double().eval()
    x, y = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (6,))
    return curvkit.fisher(model, x, y, kind="exact", structure="full")


def test_solve_and_matvec_of_lists_match_the_flat_route(F):
    assert F.permutation.direct_lists and not F.permutation.identity
    v = [torch.randn_like(p) for p in F.params]
    flat = torch.cat([t.reshape(-1) for t in v])
    D = F.to_dense()
    ref_mv = D @ flat
    ref_solve = torch.linalg.solve(D + 0.1 * torch.eye(D.shape[0], dtype=D.dtype), flat)
    out_mv, out_solve = F @ v, F.solve(v, 0.1)
    assert [t.shape for t in out_solve] == [p.shape for p in F.params]
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in out_mv]), ref_mv)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in out_solve]), ref_solve)
    torch.testing.assert_close(F.solve(flat, 0.1), ref_solve)  # the flat route, same numbers
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.solve([t * float("nan") for t in v], 0.1)
    with pytest.raises(ValueError, match=r"v has 2 tensors"):
        F.solve(v[:2], 0.1)


def test_results_never_alias_the_reused_input_buffer(F, monkeypatch):
    """An operator that returns its input: the list route copies it out of the reused buffer."""
    monkeypatch.setattr(F.operator, "_solve", lambda X, damping, mode: X)
    monkeypatch.setattr(F.operator, "_matmat", lambda X: X)
    v1 = [torch.randn_like(p) for p in F.params]
    v2 = [torch.randn_like(p) for p in F.params]
    for apply in (lambda v: F.solve(v, 0.1), lambda v: F @ v):
        r1 = apply(v1)
        apply(v2)  # reuses the input buffer
        assert all(torch.equal(a, b) for a, b in zip(r1, v1))


def test_matvec_of_a_list_stays_differentiable(F):
    """``F @ v`` for a list that requires grad keeps the autograd graph (no reused buffer)."""
    assert F.permutation.direct_lists
    v = [torch.randn_like(p, requires_grad=True) for p in F.params]
    quad = sum((a * b).sum() for a, b in zip(v, F @ v))  # vᵀ F v, gradient 2 F v
    grads = torch.autograd.grad(quad, v)
    Fv = F @ [t.detach() for t in v]
    for g, fv in zip(grads, Fv):
        torch.testing.assert_close(g, 2 * fv)

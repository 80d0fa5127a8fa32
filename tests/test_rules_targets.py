"""Outputs (N, …, C): every position a loss term, ignore_index, per-term scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.capture.targets import MAX_EXACT_SEEDS
from curvkit.testing.dense import per_sample_jacobians

f64 = torch.float64


class _Seq(nn.Module):
    """Positions interact (a mean over time), so per-datum and per-term forms differ."""

    def __init__(self, d=3, h=4, C=3):
        super().__init__()
        self.a = nn.Linear(d, h)
        self.norm = nn.LayerNorm(h)
        self.b = nn.Linear(h, C)

    def forward(self, x):
        z = self.a(x)
        z = z + z.mean(1, keepdim=True)
        return self.b(torch.tanh(self.norm(z)))


def _reference(model, x, y, kind, sampled=None, ignore_index=-100):
    """Dense per-term Fisher from torch.func Jacobians ``J_{nt}`` (independent of capture)."""
    out = model(x).detach()
    N, T, C = out.shape
    J = per_sample_jacobians(model, x).reshape(N, T, C, -1)
    p = torch.softmax(out, -1)
    mask = (y != ignore_index) if y is not None else torch.ones(N, T, dtype=torch.bool)
    terms = int(mask.sum())
    P = J.shape[-1]
    F = torch.zeros(P, P, dtype=f64)
    for n in range(N):
        if kind == "exact":
            for t in range(T):
                if mask[n, t]:
                    L = torch.diag(p[n, t]) - torch.outer(p[n, t], p[n, t])
                    F += J[n, t].T @ L @ J[n, t]
            continue
        labels = sampled[:, n] if kind == "mc" else y[n][None]
        for lab in labels:
            g = torch.zeros(P, dtype=f64)
            for t in range(T):
                if mask[n, t]:
                    yy = lab[t].clamp_min(0)
                    g += J[n, t].T @ (p[n, t] - nn.functional.one_hot(yy, C).to(f64))
            F += torch.outer(g, g) / len(labels)
    return F / terms, terms


@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
@pytest.mark.parametrize("ignore", [False, True])
def test_sequence_outputs_per_term(kind, ignore):
    torch.manual_seed(0)
    model = _Seq().double().eval()
    x = torch.randn(3, 4, 3, dtype=f64)
    y = torch.randint(0, 3, (3, 4))
    if ignore:
        y[0, 1] = y[2, 3] = -100
    g = torch.Generator().manual_seed(1)
    F = curvkit.fisher(model, x, y, kind=kind, generator=g, mc_samples=2)
    ref, terms = _reference(model, x, y, kind, F.captured.sampled)
    assert F.info["num_loss_terms"] == terms == (10 if ignore else 12)
    assert torch.allclose(F.to_dense(), ref, atol=1e-12)
    D = curvkit.fisher(model, x, y, kind=kind, generator=torch.Generator().manual_seed(1),
                       mc_samples=2, structure="diag")
    assert torch.allclose(D.diagonal(), ref.diagonal(), atol=1e-12)


def test_mc_over_positions_is_unbiased():
    """The sequence MC estimate (one seed over all positions) has the exact per-term Fisher as
    its expectation: average of 400 draws within 4 standard errors."""
    torch.manual_seed(0)
    model = _Seq(2, 3, 2).double().eval()
    x = torch.randn(2, 3, 2, dtype=f64)
    exact = curvkit.fisher(model, x).to_dense()
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([curvkit.fisher(model, x, kind="mc", generator=g, mc_samples=8).to_dense()
                         for _ in range(50)])
    mean, se = draws.mean(0), draws.std(0) / 50**0.5
    assert ((mean - exact).abs() <= 4 * se + 1e-12).float().mean() > 0.97


def test_segmentation_layout_class_last():
    """(N, C, H, W) logits moved to (N, H, W, C): each pixel is a loss term."""
    torch.manual_seed(0)

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x).movedim(1, -1)

    model = Seg().double()
    x = torch.randn(2, 2, 2, 2, dtype=f64)
    F = curvkit.fisher(model, x)
    out = model(x).detach()
    J = per_sample_jacobians(model, x).reshape(2, 4, 3, -1)
    p = torch.softmax(out, -1).reshape(2, 4, 3)
    ref = sum(J[n, t].T @ (torch.diag(p[n, t]) - torch.outer(p[n, t], p[n, t])) @ J[n, t]
              for n in range(2) for t in range(4)) / 8
    assert torch.allclose(F.to_dense(), ref, atol=1e-12)


def test_exact_cost_refused_for_large_vocabulary():
    model = nn.Linear(3, MAX_EXACT_SEEDS // 4 + 1).double()
    x = torch.randn(2, 4, 3, dtype=f64)
    with pytest.raises(ValueError, match=r"kind='exact' on outputs of shape \(2, 4, 1025\) needs "
                                         r"4100 backward passes.*use kind='mc'"):
        curvkit.fisher(model, x)
    F = curvkit.fisher(model, x, kind="mc", generator=torch.Generator().manual_seed(0))
    assert F.captured.e[0].shape[0] == 2


def test_targets_validated_and_all_ignored():
    model = _Seq().double()
    x = torch.randn(2, 3, 3, dtype=f64)
    with pytest.raises(ValueError, match=r"integer class indices of shape \(2, 3\)"):
        curvkit.fisher(model, x, torch.zeros(2, dtype=torch.long), kind="empirical")
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\) \(or be ignore_index=-100\)"):
        curvkit.fisher(model, x, torch.full((2, 3), 5), kind="empirical")
    with pytest.raises(ValueError, match="every target equals ignore_index=-100"):
        curvkit.fisher(model, x, torch.full((2, 3), -100))
    y = torch.full((2, 3), 7)
    y[1, 2] = 1
    F = curvkit.fisher(model, x, y, ignore_index=7)
    assert F.info["num_loss_terms"] == 1

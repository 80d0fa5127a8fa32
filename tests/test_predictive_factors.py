"""GLM functional variances from layer factors (no P × M Jacobian) against dense float64 truth.

Operator level: ``Kronecker`` / ``Diagonal.inverse_quad_blocks`` on an
:class:`~curvkit.linalg.OuterProductFactor` against ``Uᵀ (A + D)⁻¹ U`` with ``U`` built column by
column (``vec_r Σ_t e_{mt} a_{nt}ᵀ``) and ``torch.linalg.inv`` of ``torch.kron``; both routes for
``T > 1``. Model level: ``LaplacePosterior.functional_variance`` for Linear and Conv2d layers
with biases (kfac, foof, diag; per-parameter prior for diag) against ``J Λ⁻¹ Jᵀ`` with ``J`` from
``torch.func`` (:func:`curvkit.testing.per_sample_jacobians`); the layer factors' explicit
columns are made to raise, so the test fails if the P × M route were taken.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
import curvkit.laplace.functional as functional_mod
import curvkit.linalg.lowrank as lowrank_mod
import curvkit.linalg.memory as memory_mod
import curvkit.linalg.outer as outer_mod
from curvkit.laplace import LaplacePosterior
from curvkit.linalg import DenseFactor, Diagonal, Kronecker, OuterProductFactor, ScaledFactor, StackedFactor
from curvkit.linalg.operator import DampingError
from curvkit.testing import dense_fisher, per_sample_jacobians

f64 = torch.float64


def _spd(n: int, g: torch.Generator) -> torch.Tensor:
    X = torch.randn(n, n + 2, dtype=f64, generator=g)
    return X @ X.T / (n + 2)


def _explicit(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``(P, M)`` columns ``vec_r(Σ_t e_{mt} a_{nt}ᵀ)``, one loop per column."""
    R = e.shape[0] // a.shape[0]
    cols = [sum(torch.outer(e[m, t], a[m // R, t]) for t in range(a.shape[1])).reshape(-1)
            for m in range(e.shape[0])]
    return torch.stack(cols, 1)


def _blocks(U: torch.Tensor, Linv: torch.Tensor, R: int) -> torch.Tensor:
    Q = U.T @ Linv @ U
    n = U.shape[1] // R
    return torch.stack([Q[i * R:(i + 1) * R, i * R:(i + 1) * R] for i in range(n)])


# (T, R, d_in, d_out, expected route): T = 2, R = 10 makes the location-pair route the cheaper one
SHAPES = [(1, 3, 4, 3, "pairs"), (3, 2, 4, 3, "per_sample"), (2, 10, 4, 3, "pairs")]


@pytest.mark.parametrize("T,R,d,o,route", SHAPES)
@pytest.mark.parametrize("identity_B", [False, True])
def test_kronecker_quad_blocks_from_layer_factor(T, R, d, o, route, identity_B):
    g = torch.Generator().manual_seed(T * 10 + R)
    N = 3
    a = torch.randn(N, T, d, dtype=f64, generator=g)
    e = torch.randn(N * R, T, o, dtype=f64, generator=g)
    J = OuterProductFactor(a, e)
    assert J.quad_route() == route
    K = Kronecker(None if identity_B else _spd(o, g), _spd(d, g), d_out=o)
    delta = 0.3
    Linv = torch.linalg.inv(K.to_dense() + delta * torch.eye(o * d, dtype=f64))
    ref = _blocks(_explicit(a, e), Linv, R)
    torch.testing.assert_close(K.inverse_quad_blocks(J, R, delta), ref, rtol=1e-11, atol=1e-13)
    # a scaled factor keeps the layer form; a dense factor takes the chunked explicit route
    torch.testing.assert_close(K.inverse_quad_blocks(ScaledFactor(J, 2.0), R, delta), 4 * ref,
                               rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(K.inverse_quad_blocks(DenseFactor(_explicit(a, e)), R, delta), ref,
                               rtol=1e-11, atol=1e-13)
    # both routes of the weighted Gram agree with the explicit one
    w = torch.rand(o, d, dtype=f64, generator=g)
    Uw = _explicit(a, e)
    ref_w = _blocks(Uw, torch.diag(w.reshape(-1)), R)
    for r in ("pairs", "per_sample"):
        torch.testing.assert_close(J.weighted_block_grams64(w, route=r), ref_w, rtol=1e-11, atol=1e-13)


def test_kronecker_refuses_per_parameter_damping():
    g = torch.Generator().manual_seed(0)
    J = OuterProductFactor(torch.randn(2, 1, 3, dtype=f64, generator=g),
                           torch.randn(4, 1, 2, dtype=f64, generator=g))
    K = Kronecker(_spd(2, g), _spd(3, g))
    d = torch.linspace(0.1, 1.0, 6, dtype=f64)
    with pytest.raises(DampingError, match="functional variance with a per-parameter damping"):
        K.inverse_quad_blocks(J, 2, d)


@pytest.mark.parametrize("T", [1, 3])
def test_diagonal_quad_blocks_per_parameter_damping(T):
    """Two layer factors and one dense block, a (P,) damping: every row block on its route."""
    g = torch.Generator().manual_seed(T)
    N, R = 3, 2
    f1 = OuterProductFactor(torch.randn(N, T, 4, dtype=f64, generator=g),
                            torch.randn(N * R, T, 3, dtype=f64, generator=g))
    f2 = OuterProductFactor(torch.randn(N, 1, 2, dtype=f64, generator=g),
                            torch.randn(N * R, 1, 5, dtype=f64, generator=g))
    U3 = torch.randn(7, N * R, dtype=f64, generator=g)
    J = StackedFactor([f1, ScaledFactor(f2, 0.5), DenseFactor(U3)])
    U = torch.cat([_explicit(f1.a, f1.e), 0.5 * _explicit(f2.a, f2.e), U3])
    P = U.shape[0]
    d = torch.rand(P, dtype=f64, generator=g)
    damp = 0.1 + torch.rand(P, dtype=f64, generator=g)
    D = Diagonal(d)
    ref = _blocks(U, torch.diag(1.0 / (d + damp)), R)
    torch.testing.assert_close(D.inverse_quad_blocks(J, R, damp), ref, rtol=1e-11, atol=1e-13)
    ref_s = _blocks(U, torch.diag(1.0 / (d + 0.7)), R)
    torch.testing.assert_close(D.inverse_quad_blocks(J, R, 0.7), ref_s, rtol=1e-11, atol=1e-13)


def test_weighted_gram_refuses_what_does_not_fit(monkeypatch):
    J = OuterProductFactor(torch.randn(2, 3, 4, dtype=f64), torch.randn(4, 3, 5, dtype=f64))
    monkeypatch.setattr(memory_mod, "available_memory_bytes", lambda device="cpu": 1000)
    with pytest.raises(MemoryError, match=r"functional variance of one input through a 5×4 layer .* GB"):
        J.weighted_block_grams64(torch.ones(5, 4, dtype=f64))
    with pytest.raises(ValueError, match="w must have shape"):
        J.weighted_block_grams64(torch.ones(4, 5, dtype=f64))


# ---------------------------------------------------------------------- model level
def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 4 * 4, 3)).double()
    return {"mlp": (mlp, torch.randn(6, 5, dtype=f64)), "cnn": (cnn, torch.randn(6, 2, 4, 4, dtype=f64))}


def _no_explicit_columns(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("explicit P × M Jacobian columns of a layer factor were formed")

    for name in ("dense", "columns", "columns64", "per_sample_gradients"):
        monkeypatch.setattr(OuterProductFactor, name, refuse)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("structure", ["kfac", "foof", "diag"])
def test_functional_variance_against_torch_func(model_name, structure, monkeypatch):
    model, x = _models()[model_name]
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    P = sum(p.numel() for p in model.parameters())
    num_data = 11
    prior = (0.5 + torch.rand(P, dtype=f64, generator=torch.Generator().manual_seed(2))
             if structure == "diag" else 0.8)
    post = LaplacePosterior(model, x, y, structure=structure, prior_precision=prior,
                            num_data=num_data)
    if structure == "diag":
        F = torch.diag(dense_fisher(model, x, y).diagonal())
    else:
        F = curvkit.fisher(model, x, y, structure=structure).to_dense()
    delta = torch.as_tensor(prior, dtype=f64).expand(P)
    Linv = torch.linalg.inv(torch.diag(delta) + num_data * F)
    xt = x[:4]
    J = per_sample_jacobians(model, xt)
    ref = J @ Linv @ J.transpose(1, 2)
    _no_explicit_columns(monkeypatch)
    torch.testing.assert_close(post.functional_variance(xt), ref, rtol=1e-10, atol=1e-12)
    # one test input per chunk, and the operators' own chunks of one input: same numbers
    monkeypatch.setattr(functional_mod, "CHUNK_BYTES", 1)
    monkeypatch.setattr(outer_mod, "CHUNK_BYTES", 1)
    torch.testing.assert_close(post.functional_variance(xt), ref, rtol=1e-10, atol=1e-12)
    probs = post.predictive(xt, link_approx="probit")
    assert probs.shape == (4, 3) and torch.allclose(probs.sum(1), torch.ones(4, dtype=f64))


def test_full_predictive_chunks_test_inputs(monkeypatch):
    """The Woodbury route chunked one input at a time gives the same covariances."""
    model, x = _models()["cnn"]
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    post = LaplacePosterior(model, x, y, structure="full", prior_precision=0.8, num_data=11)
    ref = post.functional_variance(x[:4])
    monkeypatch.setattr(functional_mod, "CHUNK_BYTES", 1)
    monkeypatch.setattr(lowrank_mod, "CHUNK_BYTES", 1)
    torch.testing.assert_close(post.functional_variance(x[:4]), ref, rtol=1e-12, atol=1e-14)

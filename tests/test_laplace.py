"""Laplace posteriors against dense float64 computations, for every structure.

Dense references:

* ``"full"``: ``Λ = diag(δ) + n·F`` with ``F`` from :func:`curvkit.testing.dense_fisher`
  (``torch.func``, independent of curvkit's capture);
* ``"block_diag"``: the same ``F`` masked to its per-layer blocks;
* ``"diag"``: ``diag(F)``;
* ``"kfac"`` / ``"foof"``: the structure's own explicit matrix ``curvkit.fisher(...).to_dense()``
  (the factors themselves are tested against BackPACK/curvlinops in ``test_kfac``); these tests
  check the posterior algebra built on it.

Evidence: ``(n/N) Σ log p(y|x,θ) − ½θᵀΛ_pθ + ½ log det Λ_p − ½ log det Λ`` with ``slogdet``.
Functional covariance: ``J Λ⁻¹ Jᵀ`` with ``J`` from :func:`curvkit.testing.per_sample_jacobians`.
Monte Carlo: 10⁵ samples, ``max|Σ̂ − Λ⁻¹| ≤ 2e-2 · max diag Λ⁻¹`` (see test_laplace_linalg).
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import Case, binary, cnn, mlp, regression
from torch import nn

import curvkit
import curvkit.linalg.memory as memory_mod
from curvkit.capture import UnsupportedLayerError
from curvkit.laplace import LaplacePosterior, probit
from curvkit.laplace.posterior import LOWRANK_STRUCTURES
from curvkit.testing import dense_block_diagonal, dense_fisher, per_sample_jacobians

f64 = torch.float64
MC_SAMPLES = 100_000
MC_TOL = 2e-2
NUM_DATA = 13
STRUCTURES = ("full", "block_diag", "kfac", "foof", "diag")


def need(structure: str) -> None:
    if structure not in curvkit.structures():
        pytest.skip(f"structure {structure!r} is not registered yet")


def loglik(case: Case, num_data: int) -> torch.Tensor:
    with torch.no_grad():
        f = case.model(case.inputs)
    y = case.targets
    if case.likelihood == "classification":
        terms = torch.log_softmax(f, 1).gather(1, y[:, None])[:, 0]
    elif case.likelihood == "regression":
        terms = -0.5 * ((f - y) ** 2).sum(1) - 0.5 * f.shape[1] * math.log(2 * math.pi)
    else:
        terms = -nn.functional.binary_cross_entropy_with_logits(f, y, reduction="none").sum(1)
    return terms.sum() * num_data / case.inputs.shape[0]


def layer_sizes_param_space(model: nn.Module) -> list[int]:
    """Per-module parameter counts (weight + bias), in parameter order."""
    return [sum(p.numel() for p in m.parameters(recurse=False))
            for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


def per_layer_prior(model: nn.Module) -> list[float]:
    """One value per parameter tensor, shared by the weight and bias of a layer."""
    mods = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    return [0.6 + 0.5 * i for i, m in enumerate(mods) for _ in m.parameters(recurse=False)]


def dense_curvature(case: Case, structure: str) -> torch.Tensor:
    m, x, y = case.model, case.inputs, case.targets
    if structure in ("full", "block_diag", "diag"):
        F = dense_fisher(m, x, y, likelihood=case.likelihood)
        if structure == "block_diag":
            return dense_block_diagonal(F, layer_sizes_param_space(m))
        if structure == "diag":
            return torch.diag(F.diagonal())
        return F
    return curvkit.fisher(m, x, y, likelihood=case.likelihood, structure=structure).to_dense()


def dense_evidence(case: Case, delta: torch.Tensor, F: torch.Tensor, num_data: int) -> torch.Tensor:
    theta = torch.cat([p.detach().reshape(-1) for p in case.model.parameters()])
    Lam = torch.diag(delta) + num_data * F
    return (loglik(case, num_data) - 0.5 * (delta * theta**2).sum() + 0.5 * delta.log().sum()
            - 0.5 * torch.linalg.slogdet(Lam)[1])


CASES = {"mlp": lambda: mlp(True), "mlp_nobias": lambda: mlp(False), "cnn": cnn,
         "regression": regression, "binary": binary}


# ====================================================================== every structure vs dense
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("structure", STRUCTURES)
def test_posterior_matches_dense(case_name, structure):
    """Evidence, marginal and functional variances and the sample covariance, per structure."""
    need(structure)
    case = CASES[case_name]()
    prior = per_layer_prior(case.model)
    post = LaplacePosterior(case.model, case.inputs, case.targets, likelihood=case.likelihood,
                            structure=structure, prior_precision=prior, num_data=NUM_DATA)
    F = dense_curvature(case, structure)
    delta = post.prior.diag
    Lam = torch.diag(delta) + NUM_DATA * F
    Linv = torch.linalg.inv(Lam)
    P = Lam.shape[0]

    torch.testing.assert_close(post.log_marginal_likelihood(), dense_evidence(case, delta, F, NUM_DATA),
                               rtol=1e-10, atol=1e-10)
    # another prior, scalar: from the cached eigenvalues
    d2 = torch.full((P,), 2.5, dtype=f64)
    torch.testing.assert_close(post.log_marginal_likelihood(2.5), dense_evidence(case, d2, F, NUM_DATA),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(post.marginal_variance(), Linv.diagonal(), rtol=1e-9, atol=1e-12)
    xt = case.inputs[:3]
    J = per_sample_jacobians(case.model, xt)
    torch.testing.assert_close(post.functional_variance(xt), J @ Linv @ J.transpose(1, 2),
                               rtol=1e-9, atol=1e-12)
    S = post.sample(MC_SAMPLES, torch.Generator().manual_seed(0))
    assert S.shape == (MC_SAMPLES, P) and S.dtype == f64
    dev = S - post.mean
    err = float((dev.T @ dev / MC_SAMPLES - Linv).abs().max() / Linv.diagonal().max())
    assert err <= MC_TOL, f"{structure}: covariance error {err:.3g}"


@pytest.mark.parametrize("route", ["dual", "primal"])
@pytest.mark.parametrize("prior_kind", ["scalar", "per_tensor", "diagonal"])
def test_full_posterior_routes_and_prior_formats(route, prior_kind):
    case = mlp(True)
    P = sum(p.numel() for p in case.model.parameters())
    prior = {"scalar": 0.7, "per_tensor": [0.5, 1.0, 1.5, 2.0],
             "diagonal": 0.2 + torch.rand(P, generator=torch.Generator().manual_seed(4), dtype=f64)}
    post = LaplacePosterior(case.model, case.inputs, case.targets, prior_precision=prior[prior_kind],
                            num_data=NUM_DATA, route=route)
    assert post.route == route
    assert post.prior.kind == prior_kind
    F = dense_fisher(case.model, case.inputs, likelihood="classification")
    delta = post.prior.diag
    Linv = torch.linalg.inv(torch.diag(delta) + NUM_DATA * F)
    torch.testing.assert_close(post.log_marginal_likelihood(), dense_evidence(case, delta, F, NUM_DATA),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(post.marginal_variance(), Linv.diagonal(), rtol=1e-9, atol=1e-12)
    dev = post.sample(MC_SAMPLES, torch.Generator().manual_seed(1)) - post.mean
    assert float((dev.T @ dev / MC_SAMPLES - Linv).abs().max() / Linv.diagonal().max()) <= MC_TOL
    # any other prior format is evaluated too
    for other in (3.0, [1.0, 2.0, 3.0, 4.0], torch.linspace(0.5, 2, P, dtype=f64)):
        d = post.log_det_posterior_precision(other)
        from curvkit.laplace import PriorPrecision

        dd = PriorPrecision(other, post.params).diag
        torch.testing.assert_close(d, torch.linalg.slogdet(torch.diag(dd) + NUM_DATA * F)[1],
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_kinds_match_dense_fisher(kind):
    case = mlp(True)
    g = torch.Generator().manual_seed(3)
    post = LaplacePosterior(case.model, case.inputs, case.targets, kind=kind, num_data=NUM_DATA,
                            prior_precision=0.9, generator=g)
    cap = post.curvature.captured
    F = dense_fisher(case.model, case.inputs, cap.sampled if kind == "mc" else case.targets,
                     likelihood="classification", kind=kind)
    delta = post.prior.diag
    torch.testing.assert_close(post.log_marginal_likelihood(), dense_evidence(case, delta, F, NUM_DATA),
                               rtol=1e-10, atol=1e-10)


# ====================================================================== exact softmax rank reduction
def test_reduced_exact_fisher_equals_full():
    """``C − 1`` columns per input (``M = N(C−1)``) give the same ``J Jᵀ = n·F`` as ``C`` columns."""
    case = mlp(True)
    N, C = case.inputs.shape[0], 3
    red = LaplacePosterior(case.model, case.inputs, case.targets, num_data=NUM_DATA)
    full = LaplacePosterior(case.model, case.inputs, case.targets, num_data=NUM_DATA, reduce_rank=False)
    assert red.rank == N * (C - 1) and full.rank == N * C
    F = dense_fisher(case.model, case.inputs, likelihood="classification")
    for post in (red, full):
        J = torch.cat([f.dense() for f in post._fisher_factors()])
        JJ = post.curvature.from_layer_space(post.curvature.from_layer_space(J @ J.T).T).T
        torch.testing.assert_close(JJ, NUM_DATA * F, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(red.log_marginal_likelihood(), full.log_marginal_likelihood(),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="reduce_rank=True needs"):
        c = regression()
        LaplacePosterior(c.model, c.inputs, c.targets, likelihood="regression", reduce_rank=True)


# ====================================================================== prior optimisation
@pytest.mark.parametrize("structure", STRUCTURES)
def test_optimize_prior_precision(structure):
    need(structure)
    case = mlp(True, n=12)
    post = LaplacePosterior(case.model, case.inputs, case.targets, structure=structure, num_data=40)
    delta = post.optimize_prior_precision()
    assert post.prior_precision == delta
    best = post.log_marginal_likelihood()
    for f in (0.95, 1.05):
        assert post.log_marginal_likelihood(delta * f) < best
    # per layer: a stationary point that beats the scalar optimum
    values = post.optimize_prior_precision(per_layer=True)
    assert len(values) == 4 and values[0] == values[1] and values[2] == values[3]
    best_pl = post.log_marginal_likelihood()
    assert best_pl >= best - 1e-9
    for i in (0, 2):
        for f in (0.95, 1.05):
            v = list(values)
            v[i] = v[i + 1] = values[i] * f
            assert post.log_marginal_likelihood(v) < best_pl
    with pytest.raises(ValueError, match="supported: \\['marglik', 'gridsearch'\\]"):
        post.optimize_prior_precision(method="cv")


def test_gridsearch_minimises_validation_nll():
    case = mlp(True, n=12)
    post = LaplacePosterior(case.model, case.inputs, case.targets, num_data=40)
    xv, yv = case.inputs[:6], case.targets[:6]
    grid = [0.1, 1.0, 10.0, 100.0]
    nll = []
    for v in grid:
        post.prior_precision = v
        p = post.predictive(xv)
        nll.append(float(-p.gather(1, yv[:, None]).log().mean()))
    best = post.optimize_prior_precision(method="gridsearch", val_inputs=xv, val_targets=yv, grid=grid)
    assert best == grid[min(range(4), key=nll.__getitem__)] and post.prior_precision == best
    with pytest.raises(ValueError, match="needs held-out data"):
        post.optimize_prior_precision(method="gridsearch")
    with pytest.raises(ValueError, match="tunes a scalar"):
        post.optimize_prior_precision(method="gridsearch", per_layer=True, val_inputs=xv, val_targets=yv)
    with pytest.raises(ValueError, match="finite positive"):
        post.optimize_prior_precision(method="gridsearch", val_inputs=xv, val_targets=yv, grid=[0.0])


def test_scalar_optimum_satisfies_mackay_fixed_point():
    """At the optimum ``δ‖θ‖² = γ = Σ_i λ_i/(δ + λ_i)`` (eigenvalues ``λ`` of ``n·F``)."""
    case = mlp(True, n=12)
    post = LaplacePosterior(case.model, case.inputs, case.targets, num_data=40)
    delta = post.optimize_prior_precision()
    lam = torch.linalg.eigvalsh(40 * dense_fisher(case.model, case.inputs)).clamp_min(0)
    gamma = (lam / (delta + lam)).sum()
    assert abs(float(delta * (post.mean**2).sum() / gamma) - 1.0) < 1e-4


# ====================================================================== predictive
def test_glm_predictive_classification():
    case = mlp(True)
    post = LaplacePosterior(case.model, case.inputs, case.targets, num_data=NUM_DATA, prior_precision=0.5)
    x = case.inputs[:4]
    with torch.no_grad():
        f = case.model(x)
    Sf = post.functional_variance(x)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * Sf.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(post.predictive(x), torch.softmax(kappa * f, 1))
    torch.testing.assert_close(probit(f, Sf, "classification"), torch.softmax(kappa * f, 1))
    # MC link: E[softmax(f + L ε)], compared with a dense Monte Carlo estimate
    p_mc = post.predictive(x, link_approx="mc", n_samples=20000, generator=torch.Generator().manual_seed(0))
    L = torch.linalg.cholesky(Sf + 1e-12 * torch.eye(3, dtype=f64))
    eps = torch.randn(20000, 4, 3, 1, generator=torch.Generator().manual_seed(9), dtype=f64)
    ref = torch.softmax(f + (L @ eps)[..., 0], -1).mean(0)
    torch.testing.assert_close(p_mc, ref, rtol=0, atol=1e-2)
    torch.testing.assert_close(p_mc.sum(1), torch.ones(4, dtype=f64))


def test_nn_predictive_averages_sampled_networks():
    case = mlp(True)
    post = LaplacePosterior(case.model, case.inputs, case.targets, num_data=NUM_DATA)
    x = case.inputs[:4]
    p = post.predictive(x, "nn", n_samples=50, generator=torch.Generator().manual_seed(2))
    thetas = post.sample(50, torch.Generator().manual_seed(2))
    ref = []
    for th in thetas:
        views = [t.view_as(q) for t, q in zip(th.split(post.numels), post.params)]
        params = dict(zip(post.param_names, views))
        ref.append(torch.softmax(torch.func.functional_call(case.model, params, (x,)), 1))
    torch.testing.assert_close(p, torch.stack(ref).mean(0))


def test_regression_predictive_glm_and_nn_agree_for_linear_model():
    """For a model linear in θ the GLM and the sampled-network predictive coincide."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x, y = torch.randn(6, 3, dtype=f64), torch.randn(6, 2, dtype=f64)
    post = LaplacePosterior(model, x, y, likelihood="regression", prior_precision=0.5, num_data=3)
    mean, cov = post.predictive(x[:2])
    J = per_sample_jacobians(model, x[:2])
    F = dense_fisher(model, x, likelihood="regression")
    Linv = torch.linalg.inv(0.5 * torch.eye(8, dtype=f64) + 3 * F)
    torch.testing.assert_close(cov, J @ Linv @ J.transpose(1, 2), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(mean, model(x[:2]))
    m_nn, c_nn = post.predictive(x[:2], "nn", n_samples=40000, generator=torch.Generator().manual_seed(1))
    scale = float(cov.diagonal(dim1=1, dim2=2).max())
    assert float((m_nn - mean).abs().max()) < 0.03 * scale**0.5 * 4
    assert float((c_nn - cov).abs().max()) < 0.05 * scale


def test_binary_probit():
    case = binary()
    post = LaplacePosterior(case.model, case.inputs, case.targets, likelihood="binary", num_data=NUM_DATA)
    x = case.inputs[:3]
    with torch.no_grad():
        f = case.model(x)
    Sf = post.functional_variance(x)
    torch.testing.assert_close(post.predictive(x),
                               torch.sigmoid(f / torch.sqrt(1 + math.pi / 8 * Sf.diagonal(dim1=1, dim2=2))))


# ====================================================================== dtype, reuse
def test_float32_model():
    case = mlp(True)
    model32 = case.model.float()
    x32 = case.inputs.float()
    post = LaplacePosterior(model32, x32, case.targets, num_data=NUM_DATA)
    S = post.sample(5, torch.Generator().manual_seed(0))
    assert S.dtype == torch.float32 and S.shape == (5, post.num_params)
    case64 = mlp(True)
    ref = LaplacePosterior(case64.model, case64.inputs, case64.targets, num_data=NUM_DATA)
    torch.testing.assert_close(post.log_marginal_likelihood(), ref.log_marginal_likelihood(),
                               rtol=1e-5, atol=1e-5)
    assert post.functional_variance(x32[:2]).dtype == torch.float32


def test_prebuilt_curvature_is_reused():
    case = mlp(True)
    F = curvkit.fisher(case.model, case.inputs, case.targets)
    a = LaplacePosterior(case.model, case.inputs, case.targets, curvature=F, num_data=NUM_DATA)
    b = LaplacePosterior(case.model, case.inputs, case.targets, num_data=NUM_DATA)
    assert a.curvature is F
    torch.testing.assert_close(a.log_marginal_likelihood(), b.log_marginal_likelihood())
    assert "structure='full'" in repr(a) and "M=12" in repr(a)


@pytest.mark.parametrize("route", ["dual", "primal"])
def test_scalar_prior_change_reuses_the_core(route, monkeypatch):
    """Changing a scalar δ rescales ``K_V = K_J/δ``: no new Gram / ``J Jᵀ`` product is formed."""
    from curvkit.linalg import LowRankFactor, OuterProductFactor, StackedFactor

    case = mlp(True)
    post = LaplacePosterior(case.model, case.inputs, case.targets, num_data=NUM_DATA, route=route)

    def forbidden(*args, **kwargs):
        raise AssertionError("the core was recomputed")

    for cls in (LowRankFactor, OuterProductFactor, StackedFactor):  # every Gram / U Uᵀ product
        for method in ("gram", "gram64", "outer_gram64", "columns"):
            if method in vars(cls):
                monkeypatch.setattr(cls, method, forbidden)
    post.prior_precision = 4.0
    monkeypatch.undo()
    fresh = LaplacePosterior(case.model, case.inputs, case.targets, num_data=NUM_DATA, route=route,
                             prior_precision=4.0)
    torch.testing.assert_close(post.log_marginal_likelihood(), fresh.log_marginal_likelihood())
    torch.testing.assert_close(post.marginal_variance(), fresh.marginal_variance())


def test_prior_setter_rebuilds():
    case = mlp(True)
    post = LaplacePosterior(case.model, case.inputs, case.targets, num_data=NUM_DATA)
    e3 = post.log_marginal_likelihood(3.0)
    post.prior_precision = 3.0
    torch.testing.assert_close(post.log_marginal_likelihood(), e3)
    assert set(LOWRANK_STRUCTURES) == {"full", "block_diag"}


# ====================================================================== bad input (pinned)
def _post(case=None, **kw):
    case = case or mlp(True)
    return LaplacePosterior(case.model, case.inputs, case.targets, **kw)


@pytest.mark.parametrize("prior, error, match", [
    (0.0, ValueError, r"must be finite and > 0.*got 0\.0"),
    (-1.0, ValueError, r"must be finite and > 0"),
    (float("nan"), ValueError, r"must be finite and > 0"),
    ([1.0, 1.0, -2.0, 1.0], ValueError, r"got -2\.0 at 2\.weight"),
    ([1.0, 2.0], ValueError, r"sequence of length 2; expected .* 4 positive numbers"),
    (torch.ones(5), ValueError, r"shape \(5,\); expected .*length 4 or 39"),
    (torch.ones(2, 2), ValueError, r"shape \(2, 2\)"),
    ([torch.ones(4, 5), torch.ones(4), torch.ones(3, 4), torch.ones(2)], ValueError,
     r"prior_precision\[3\] \(2\.bias\) is \(2,\)"),
    (True, TypeError, "must be a positive scalar"),
    ("1.0", TypeError, "must be a positive scalar"),
])
def test_bad_prior_precision(prior, error, match):
    with pytest.raises(error, match=match):
        _post(prior_precision=prior)


def test_bad_inputs():
    case = mlp(True)
    with pytest.raises(ValueError, match="the batch is empty"):
        LaplacePosterior(case.model, case.inputs[:0], case.targets[:0])
    with pytest.raises(ValueError, match="targets must be a Tensor with 6 rows"):
        LaplacePosterior(case.model, case.inputs, case.targets[:3])
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="num_data must be a positive int"):
            _post(num_data=bad)
    with pytest.raises(ValueError, match="unknown structure 'lowrank'"):
        _post(structure="lowrank")
    with pytest.raises(ValueError, match="route must be"):
        _post(route="fast")
    post = _post()
    with pytest.raises(ValueError, match="n must be a positive int"):
        post.sample(0)
    with pytest.raises(ValueError, match="unknown pred_type"):
        post.predictive(case.inputs, pred_type="bnn")
    with pytest.raises(ValueError, match="unknown link_approx"):
        post.predictive(case.inputs, link_approx="laplace_bridge")
    with pytest.raises(ValueError, match="link_approx must be 'mc'"):
        post.predictive(case.inputs, pred_type="nn", link_approx="probit")
    no_targets = LaplacePosterior(case.model, case.inputs)
    with pytest.raises(ValueError, match="pass targets="):
        no_targets.log_marginal_likelihood()


def test_norm_layer_posterior_exact():
    """LayerNorm parameters (explicit per-sample gradients) enter the full posterior exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).double()
    x, y = torch.randn(5, 4, dtype=f64), torch.randint(0, 2, (5,))
    post = LaplacePosterior(model, x, y, prior_precision=0.5)
    Lam = post.num_data * dense_fisher(model, x) + 0.5 * torch.eye(post.num_params, dtype=f64)
    assert torch.allclose(post.marginal_variance(), torch.linalg.inv(Lam).diagonal(), atol=1e-10)
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(BatchNorm1d\) normalises with batch"):
        LaplacePosterior(bn, x, y)


def test_kronecker_posterior_needs_one_prior_per_layer():
    need("kfac")
    with pytest.raises(ValueError, match=r"layer '0' needs one prior precision for the whole layer"):
        _post(structure="kfac", prior_precision=[1.0, 2.0, 1.0, 1.0])


def test_memory_errors_state_gigabytes(monkeypatch):
    post = _post()
    with pytest.raises(MemoryError, match=r"needs \d+\.\d+ GB"):
        post.sample(10**12)
    # a general elementwise prior needs the per-sample gradients of each layer
    monkeypatch.setattr(memory_mod, "available_memory_bytes", lambda device="cpu": 100)
    with pytest.raises(MemoryError, match=r"per-sample gradients.*needs .* GB"):
        _post(prior_precision=torch.linspace(1, 2, 39, dtype=f64))

"""Exact, MC and empirical Fisher in Woodbury form vs dense float64 references (torch.func)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.capture import sample_targets
from curvkit.testing import assert_operator_matches, dense_block_diagonal, dense_fisher
from tests.cases import all_cases, cnn, mlp

CASES = all_cases()
KINDS = ("exact", "mc", "empirical")


def _block_sizes(F: curvkit.Curvature) -> list[int]:
    return [layer.size for layer in F.layers]


def _reference(case, kind: str, structure: str, F: curvkit.Curvature) -> torch.Tensor:
    if kind == "mc":
        dense = dense_fisher(case.model, case.inputs, F.captured.sampled, likelihood=case.likelihood,
                             kind="mc")
    else:
        dense = dense_fisher(case.model, case.inputs, case.targets, likelihood=case.likelihood,
                             kind=kind)
    if structure == "block_diag":
        # F.params follow model order with each layer's weight and bias adjacent
        dense = dense_block_diagonal(dense, _block_sizes(F))
    return dense


@pytest.mark.parametrize("structure", ["full", "block_diag"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_dense_reference(case, kind, structure):
    gen = torch.Generator().manual_seed(7)
    F = curvkit.fisher(case.model, case.inputs, case.targets, likelihood=case.likelihood, kind=kind,
                       structure=structure, mc_samples=2, generator=gen)
    dense = _reference(case, kind, structure, F)
    assert F.shape == dense.shape
    assert_operator_matches(F, dense, rtol=1e-10, atol=1e-12, damping=0.1, solve_rtol=1e-10,
                            generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("route", ["dual", "primal"])
def test_routes_agree(route):
    case = mlp(True)
    F = curvkit.fisher(case.model, case.inputs, case.targets, kind="exact", route=route)
    dense = dense_fisher(case.model, case.inputs, likelihood="classification", kind="exact")
    assert F.operator.route == route
    assert_operator_matches(F, dense, damping=0.3, generator=torch.Generator().manual_seed(1))


def test_primal_route_allows_zero_damping_when_nonsingular():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    # regression: F = I ⊗ (1/N) Σ x xᵀ is non-singular (softmax Fisher would have the null
    # direction 1 ⊗ anything, since diag(p) − ppᵀ has rank C − 1)
    F = curvkit.fisher(model, x, likelihood="regression", kind="exact")  # P = 6 <= M = 40 -> primal
    assert F.operator.route == "primal"
    v = torch.randn(6, dtype=torch.float64)
    dense = dense_fisher(model, x, likelihood="regression", kind="exact")
    torch.testing.assert_close(F.solve(v, 0.0), torch.linalg.solve(dense, v))
    with pytest.raises(curvkit.linalg.SingularError, match="singular"):
        curvkit.fisher(model, x, likelihood="classification", kind="exact").solve(v, 0.0)


@pytest.mark.parametrize("gram_route", ["hadamard", "per_sample"])
def test_conv_gram_routes_agree(gram_route):
    case = cnn()
    F = curvkit.fisher(case.model, case.inputs, kind="exact", gram_route=gram_route)
    auto = curvkit.fisher(case.model, case.inputs, kind="exact")
    torch.testing.assert_close(F.operator.gram(), auto.operator.gram(), rtol=1e-12, atol=1e-14)
    v = torch.randn(F.shape[0], dtype=torch.float64)
    torch.testing.assert_close(F.solve(v, 1e-2), auto.solve(v, 1e-2), rtol=1e-9, atol=1e-12)


def test_mc_is_deterministic_given_generator_and_uses_sampled_labels():
    case = mlp(True)
    F1 = curvkit.fisher(case.model, case.inputs, kind="mc", mc_samples=3,
                        generator=torch.Generator().manual_seed(3))
    F2 = curvkit.fisher(case.model, case.inputs, kind="mc", mc_samples=3,
                        generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(F1.to_dense(), F2.to_dense(), rtol=0, atol=0)
    # the same generator state reproduces the labels through the public sampler
    with torch.no_grad():
        out = case.model(case.inputs)
    labels = sample_targets(out, "classification", 3, torch.Generator().manual_seed(3))
    torch.testing.assert_close(labels, F1.captured.sampled)


@pytest.mark.parametrize("case", [mlp(True), all_cases()[3], all_cases()[4]],
                         ids=["classification", "regression", "binary"])
def test_mc_average_converges_to_exact(case):
    """Mean of S MC draws -> exact Fisher. Tolerance: 5 standard errors of the entrywise mean."""
    S = 4000
    exact = dense_fisher(case.model, case.inputs, likelihood=case.likelihood, kind="exact")
    F = curvkit.fisher(case.model, case.inputs, likelihood=case.likelihood, kind="mc", mc_samples=S,
                       generator=torch.Generator().manual_seed(11), route="dual")
    # per-sample matrices to estimate the standard error of the mean
    per = [
        dense_fisher(case.model, case.inputs, F.captured.sampled[s : s + 1], likelihood=case.likelihood,
                     kind="mc")
        for s in range(200)
    ]
    std = torch.stack(per).std(0)
    mean = F.to_dense()
    err = (mean - exact).abs()
    assert (err <= 5 * std / S**0.5 + 1e-12).float().mean() > 0.99
    assert (mean - exact).norm() / exact.norm() < 0.05


def test_fisher_dtype_float32_close_to_float64():
    case = mlp(True)
    m32 = case.model.float()
    F = curvkit.fisher(m32, case.inputs.float(), kind="exact")
    dense = dense_fisher(case.model.double(), case.inputs, kind="exact")
    v = torch.randn(F.shape[0])
    x = F.solve(v, 0.1)
    ref = torch.linalg.solve(dense + 0.1 * torch.eye(dense.shape[0], dtype=torch.float64), v.double())
    torch.testing.assert_close(x.double(), ref, rtol=1e-4, atol=1e-5)


def test_params_subset_and_frozen_bias():
    case = mlp(True)
    params = [case.model[0].weight, case.model[2].weight, case.model[2].bias]
    F = curvkit.fisher(case.model, case.inputs, kind="exact", params=params)
    dense = dense_fisher(case.model, case.inputs, kind="exact", params=params)
    assert_operator_matches(F, dense, damping=0.1, generator=torch.Generator().manual_seed(2))


def test_params_in_unusual_order():
    case = mlp(True)
    params = [case.model[2].bias, case.model[0].weight, case.model[2].weight, case.model[0].bias]
    F = curvkit.fisher(case.model, case.inputs, kind="empirical", targets=case.targets, params=params,
                       structure="block_diag")
    dense = dense_fisher(case.model, case.inputs, case.targets, kind="empirical", params=params)
    # block diagonal in layer terms: mask entries of different layers
    owner = torch.cat([torch.full((p.numel(),), 1 if any(p is q for q in (params[0], params[2])) else 0)
                       for p in params])
    mask = owner[:, None] == owner[None, :]
    assert_operator_matches(F, dense * mask, damping=0.1, generator=torch.Generator().manual_seed(2))


def test_linear_on_sequence_inputs_sums_over_locations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    F = curvkit.fisher(model, x, kind="exact")
    dense = dense_fisher(model, x, kind="exact")
    assert_operator_matches(F, dense, damping=0.1, generator=torch.Generator().manual_seed(2))


def test_repr_names_fisher_formula():
    case = mlp(True)
    F = curvkit.fisher(case.model, case.inputs, kind="exact")
    assert "(1/N)" in F.formula and "E_{y∼p" in F.formula
    assert "structure='full'" in repr(F)


def test_factorize_precomputes_and_chains():
    case = mlp(True)
    F = curvkit.fisher(case.model, case.inputs, kind="exact")
    assert F.factorize(0.5) is F
    assert 0.5 in F.operator._chol
    v = torch.randn(F.shape[0], dtype=torch.float64)
    dense = dense_fisher(case.model, case.inputs, kind="exact")
    ref = torch.linalg.solve(dense + 0.5 * torch.eye(dense.shape[0], dtype=torch.float64), v)
    torch.testing.assert_close(F.solve(v, 0.5), ref)


def test_loss_free_structure_reports_no_kind():
    case = mlp(True)
    F = curvkit.fisher(case.model, case.inputs, kind="empirical", structure="foof")
    assert F.kind is None
    assert "loss-independent" in F.formula

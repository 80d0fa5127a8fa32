"""LaplacePosterior: state_dict round trip (every structure), evidence at a new prior by one
Cholesky (the cost rule), per-parameter damping of a Curvature against dense float64."""

from __future__ import annotations

import io

import pytest
import torch
from cases import mlp

import curvkit
from curvkit.laplace import LaplacePosterior
from curvkit.laplace.evidence import EIGH_OVER_CHOLESKY, use_eigenvalues
from curvkit.testing import dense_fisher

f64 = torch.float64
NUM_DATA = 13


@pytest.mark.parametrize("structure", ["full", "block_diag", "kfac", "foof", "diag"])
def test_state_dict_round_trips_through_torch_load_weights_only(structure):
    case = mlp(True)
    prior = [0.5, 0.5, 1.5, 1.5] if structure != "full" else torch.linspace(0.5, 2, 39, dtype=f64)
    a = LaplacePosterior(case.model, case.inputs, case.targets, structure=structure,
                         prior_precision=prior, num_data=NUM_DATA)
    ev = a.log_marginal_likelihood()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    # a posterior of the same model built on another batch and prior gets a's numbers back
    b = LaplacePosterior(case.model, case.inputs[:3], case.targets[:3], structure=structure,
                         prior_precision=5.0, num_data=4)
    b.load_state_dict(state)
    torch.testing.assert_close(b.log_marginal_likelihood(), ev, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.marginal_variance(), a.marginal_variance(), rtol=1e-12, atol=1e-14)
    x = case.inputs[:2]
    torch.testing.assert_close(b.functional_variance(x), a.functional_variance(x), rtol=1e-12,
                               atol=1e-14)
    g = torch.Generator().manual_seed(3)
    torch.testing.assert_close(b.sample(4, g), a.sample(4, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="the state is for structure="):
        other = "diag" if structure != "diag" else "full"
        LaplacePosterior(case.model, case.inputs, case.targets, structure=other).load_state_dict(state)


def test_evidence_at_a_new_scalar_prior_takes_one_cholesky(monkeypatch):
    """No eigendecomposition for one new value (cost rule); the number is the dense one."""
    case = mlp(True)
    post = LaplacePosterior(case.model, case.inputs, case.targets, num_data=NUM_DATA)

    def forbidden(*args, **kwargs):
        raise AssertionError("an eigendecomposition was computed for a single prior value")

    monkeypatch.setattr(torch.linalg, "eigvalsh", forbidden)
    monkeypatch.setattr(torch.linalg, "eigh", forbidden)
    got = post.log_det_posterior_precision(2.0)
    monkeypatch.undo()
    F = dense_fisher(case.model, case.inputs, likelihood="classification")
    P = F.shape[0]
    torch.testing.assert_close(got, torch.logdet(NUM_DATA * F + 2.0 * torch.eye(P, dtype=f64)),
                               rtol=1e-11, atol=1e-11)
    assert not use_eigenvalues(1, cached=False) and use_eigenvalues(1, cached=True)
    assert use_eigenvalues(EIGH_OVER_CHOLESKY + 1, cached=False)


def test_curvature_solve_with_per_parameter_damping_matches_dense():
    case = mlp(True)
    F = curvkit.fisher(case.model, case.inputs, case.targets, structure="full")
    P = F.shape[0]
    d = torch.linspace(0.2, 1.3, P, dtype=f64)  # parameter order (the layer layout permutes it)
    A = F.to_dense() + torch.diag(d)
    v = torch.randn(P, generator=torch.Generator().manual_seed(0), dtype=f64)
    torch.testing.assert_close(F.solve(v, damping=d), torch.linalg.solve(A, v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(F.logdet(d), torch.logdet(A), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(F.inverse_diagonal(d), torch.linalg.inv(A).diagonal(), rtol=1e-10,
                               atol=1e-12)
    K = curvkit.fisher(case.model, case.inputs, case.targets, structure="kfac")
    with pytest.raises(TypeError, match="per-parameter damping .* not exact"):
        K.solve(v, damping=d)


def test_laplace_reaches_capture_only_through_curvature_and_has_no_cycle():
    import ast
    import pathlib

    pkg = pathlib.Path(curvkit.__file__).parent / "laplace"
    for path in pkg.glob("*.py"):
        mods = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("curvkit"):
                mods.add(node.module)
        parts = {m.split(".")[1] for m in mods if m.count(".") >= 1}
        assert parts <= {"linalg", "curvature", "laplace", "typing"}, (path.name, parts)
        if path.name in ("predictive.py", "evidence.py", "prior.py"):  # no posterior ⇄ cycle
            assert "curvkit.laplace.posterior" not in mods, path.name
        assert len(path.read_text().splitlines()) < 500, path.name

"""Tests of ``curvkit.validate.compare`` and the ``python -m curvkit validate`` command line.

Metrics are recomputed here from dense float64 ground truth (``curvkit.testing.dense_fisher``,
explicit ``torch.kron`` of the exposed factors, ``torch.linalg.solve``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import curvkit
from curvkit.__main__ import main
from curvkit.curvature.kfac import factors_of
from curvkit.testing import dense_block_diagonal, dense_fisher
from curvkit.validate import ValidationReport, compare
from tests.cases import Case, deep_linear_regression, mlp, single_linear_one_point

f64 = torch.float64
LAM = 1e-2


def _compare(case: Case, **kw) -> ValidationReport:
    return compare(case.model, case.inputs, case.targets, likelihood=case.likelihood, **kw)


def _row(report: ValidationReport, structure: str, mode: str = "exact"):
    (row,) = [r for r in report.rows if r.structure == structure and r.damping_mode == mode]
    return row


def _grad(case: Case) -> torch.Tensor:
    model = case.model
    out = model(case.inputs)
    loss = nn.functional.cross_entropy(out, case.targets)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_metrics_match_dense_recomputation():
    case = mlp(True)
    report = _compare(case, damping=LAM)
    assert [(r.structure, r.damping_mode) for r in report.rows] == [
        ("kfac", "exact"), ("kfac", "heuristic"), ("foof", "exact"), ("block_diag", "exact"),
        ("diag", "exact")]
    F = dense_fisher(case.model, case.inputs, case.targets, likelihood=case.likelihood)
    P = F.shape[0]
    eye = torch.eye(P, dtype=f64)
    D = F + LAM * eye
    g = _grad(case)
    x = torch.linalg.solve(D, g)
    sizes = [p.numel() for p in case.model.parameters()]
    layer_sizes = [sizes[0] + sizes[1], sizes[2] + sizes[3]]
    approx = {
        "block_diag": dense_block_diagonal(F, layer_sizes) + LAM * eye,
        "diag": torch.diag(F.diagonal()) + LAM * eye,
    }
    for name, Dt in approx.items():
        row = _row(report, name)
        xt = torch.linalg.solve(Dt, g)
        assert row.matrix_error == pytest.approx(float((Dt - D).norm() / D.norm()), rel=1e-8)
        assert row.direction_error == pytest.approx(float((xt - x).norm() / x.norm()), rel=1e-8)
        assert row.direction_cosine == pytest.approx(_cos(xt, x), rel=1e-8)

    # cos_Â with Â from the exposed FOOF factor, layer blocks [W | b]
    Ff = curvkit.fisher(case.model, case.inputs, structure="foof")
    A = factors_of(Ff).A
    xt = torch.linalg.solve(approx["block_diag"], g)

    def blocks(v):
        w0, b0, w1, b1 = v.split(sizes)
        return [torch.cat([w0.reshape(4, 5), b0.reshape(4, 1)], 1),
                torch.cat([w1.reshape(3, 4), b1.reshape(3, 1)], 1)]

    per = []
    for U, V, Al in zip(blocks(xt), blocks(x), A):
        per.append(float(torch.trace(U @ Al @ V.T)
                         / math.sqrt(torch.trace(U @ Al @ U.T) * torch.trace(V @ Al @ V.T))))
    row = _row(report, "block_diag")
    assert row.cosine_A_layers == pytest.approx(per, rel=1e-8)
    assert row.cosine_A == pytest.approx(sum(per) / 2, rel=1e-8)
    assert report.baseline["direction_cosine"] == pytest.approx(_cos(g, x), rel=1e-8)


def test_kfac_rows_use_eqs_3_and_4():
    case = mlp(True)
    report = _compare(case, damping=LAM, structures=("kfac",))
    F = dense_fisher(case.model, case.inputs, case.targets, likelihood=case.likelihood)
    D = F + LAM * torch.eye(F.shape[0], dtype=f64)
    K = curvkit.fisher(case.model, case.inputs, case.targets, structure="kfac")
    g = _grad(case)
    x = torch.linalg.solve(D, g)
    for mode in ("exact", "heuristic"):
        Dt = torch.zeros_like(D)
        Dt[K.index[:, None], K.index[None, :]] = K.operator.damped_dense(LAM, mode)
        row = _row(report, "kfac", mode)
        assert row.matrix_error == pytest.approx(float((Dt - D).norm() / D.norm()), rel=1e-8)
        assert row.direction_cosine == pytest.approx(_cos(torch.linalg.solve(Dt, g), x), rel=1e-8)


@pytest.mark.parametrize("case", [single_linear_one_point(), deep_linear_regression()],
                         ids=["linear_1pt", "deep_linear_regression"])
def test_kfac_exact_where_kfac_is_exact(case):
    report = _compare(case, damping=LAM, structures=("kfac", "block_diag"))
    for name in ("kfac", "block_diag"):
        row = _row(report, name)
        if case.name == "linear_1pt":  # one layer: block-diagonal = full Fisher
            assert row.matrix_error < 1e-12 and row.direction_error < 1e-8
            assert row.direction_cosine == pytest.approx(1.0, abs=1e-10)
    assert _row(report, "kfac").matrix_error == pytest.approx(_row(report, "block_diag").matrix_error,
                                                               rel=1e-8, abs=1e-12)


def test_woodbury_reference_matches_explicit():
    case = mlp(True)
    ex = _compare(case, damping=LAM)
    wb = _compare(case, damping=LAM, reference="woodbury")
    for r_ex, r_wb in zip(ex.rows, wb.rows):
        assert r_wb.matrix_error is None
        assert r_wb.direction_error == pytest.approx(r_ex.direction_error, rel=1e-7)
        assert r_wb.direction_cosine == pytest.approx(r_ex.direction_cosine, rel=1e-7)
        assert r_wb.cosine_A == pytest.approx(r_ex.cosine_A, rel=1e-7)
    assert "n/a" in str(wb)


def test_mc_uses_the_same_samples_for_every_structure():
    """One layer: block_diag is the full Fisher, so with shared MC labels its error is 0."""
    case = single_linear_one_point()
    x = torch.randn(6, 4, dtype=f64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    report = compare(case.model, x, y, kind="mc", structures=("block_diag", "diag"), damping=LAM,
                     generator=g, mc_samples=2)
    assert _row(report, "block_diag").matrix_error < 1e-12
    assert report.settings["mc_seed"] is None and report.settings["mc_samples"] == 2
    seeded = compare(case.model, x, y, kind="mc", structures=("block_diag",), damping=LAM)
    assert isinstance(seeded.settings["mc_seed"], int)


def test_report_formats():
    case = mlp(True)
    report = _compare(case, damping=LAM)
    text = str(report)
    for piece in ("kfac", "heuristic", "foof", "block_diag", "diag", "cos_Â(x̃,x)", "Fig 3B",
                  "closest to the exact Fisher"):
        assert piece in text
    d = json.loads(json.dumps(report.to_dict()))
    assert d["settings"]["num_params"] == 39 and len(d["rows"]) == 5
    assert set(d["pairs"]) == {"cos_Â(kfac[exact], foof)", "cos_Â(kfac[heuristic], foof)"}
    assert report.closest().direction_cosine == max(r.direction_cosine for r in report.rows)
    assert report.closest("matrix_error").matrix_error == min(r.matrix_error for r in report.rows)
    for r in report.rows:
        assert all(math.isfinite(v) for v in (r.matrix_error, r.direction_error, r.direction_cosine,
                                               r.cosine_A, r.cosine_A_network))
        assert -1 - 1e-12 <= r.direction_cosine <= 1 + 1e-12
    with pytest.raises(ValueError, match="unknown metric 'speed'"):
        report.closest("speed")


def test_float32_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    report = compare(model, x, y, damping=1e-3)
    assert report.settings["dtype"] == "float32"
    assert all(math.isfinite(r.direction_cosine) for r in report.rows)


def test_bad_input():
    case = mlp(True)
    with pytest.raises(ValueError, match="unknown reference 'dense'; valid: 'explicit', 'woodbury'"):
        _compare(case, reference="dense")
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        _compare(case, damping=0.0)
    with pytest.raises(ValueError, match=r"unknown structures \['kfc'\]; registered: "):
        _compare(case, structures=("kfac", "kfc"))
    with pytest.raises(ValueError, match="structures is empty"):
        _compare(case, structures=())
    with pytest.raises(ValueError, match="compare needs the data targets"):
        compare(case.model, case.inputs, None)
    with pytest.raises(ValueError, match="classification targets must be integer class indices"):
        compare(case.model, case.inputs, case.targets.double())


# ---------------------------------------------------------------------- command line
def test_cli_validate(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "report.json"
    rc = main(["validate", "--hidden", "8", "--num-data", "24", "--epochs", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "digits demo: MLP 64-8-10" in text and "block_diag" in text
    d = json.loads(out.read_text())
    assert d["demo"]["architecture"] == "64-8-10" and len(d["rows"]) == 5


def test_cli_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["validate", "--reference", "dense"])
    assert exc.value.code == 2
    assert "invalid choice: 'dense'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["validate", "--hidden", "8,x"])
    assert "expected comma-separated integers" in capsys.readouterr().err
    pytest.importorskip("sklearn")
    assert main(["validate", "--num-data", "100000", "--epochs", "0"]) == 2
    assert "num_data must lie in [1, 1438]" in capsys.readouterr().err

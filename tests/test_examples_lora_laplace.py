"""Smoke test of examples/lora_laplace.py at its --quick size."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_lora_laplace_quick(capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("lora_laplace",
                                                  ROOT / "examples" / "lora_laplace.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--quick", "--no-progress", "--threads", "1"])
    names = [r["method"] for r in rows]
    assert names[:4] == ["MAP (no Laplace)", "curvkit full (Woodbury, MC)", "curvkit kfac (MC)",
                         "curvkit diag (MC)"]
    for r in rows:
        nll, ece, acc = r["metrics"]
        assert math.isfinite(nll) and 0 <= ece <= 1 and 0 <= acc <= 1, r
        if r["prior"] is not None:
            assert r["prior"] > 0
    assert "test NLL" in capsys.readouterr().out


def test_lora_laplace_torch_diag_on_flat_tokens_is_the_exact_ggn_diagonal():
    """laplace-torch's DiagLaplace on the example's (N·T, V) logits, one sequence per batch, is
    n·diag(F) of curvkit's exact Fisher over every token (the like-with-like claim of the table)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    laplace = pytest.importorskip("laplace")
    import torch

    import curvkit

    spec = importlib.util.spec_from_file_location("lora_laplace",
                                                  ROOT / "examples" / "lora_laplace.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    x, y = mod.markov_data(6, 6, 8, 3, g)
    lm = mod.build_model(1, 16, 8, 6, 2, 0.3)
    for p in lm.parameters():
        if p.requires_grad:  # lora_B starts at zero: give every adapter a nonzero value
            p.data.normal_(0, 0.3, generator=g)
    lm.eval()
    la = laplace.Laplace(mod.FlatTokens(lm), "classification", subset_of_weights="all",
                         hessian_structure="diag")
    la.fit(mod.TokenLoader(x, y, 1))
    model = mod.Tokens(lm).eval()
    F = curvkit.fisher(model, x, y, kind="exact", structure="diag")
    ours = y.numel() * F.diagonal()
    assert float(ours.abs().max()) > 0
    torch.testing.assert_close(la.H, ours.to(la.H.dtype), rtol=1e-3, atol=1e-5 * float(ours.max()))
    assert float(la.loss) == pytest.approx(float(torch.nn.functional.cross_entropy(
        model(x).detach().reshape(-1, 8), y.reshape(-1), reduction="sum")), rel=1e-5)

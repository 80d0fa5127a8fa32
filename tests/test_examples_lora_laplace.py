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

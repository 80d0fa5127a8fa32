"""Smoke test of the main demo (the README's first command runs it in full)."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quickstart_runs_and_residuals_are_tiny(capsys):
    _load("quickstart").main(["--batch", "20", "--epochs", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("exact", "mc", "empirical"))]
    assert len(rows) == 6
    for row in rows:
        assert float(row[5]) < 1e-9, row  # relative residual against the explicit matrix
